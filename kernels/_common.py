"""Helpers shared by the kernels: input validation (errors name the argument and what would be
right) and the launch-time choices that differ between compiled kernels and the Triton interpreter.
"""

import contextlib
import functools
import inspect
import itertools
import math
import numbers
import os

import torch

# The one place TRITON_INTERPRET is read (terrafm.backends asks here too). Triton reads it when a
# kernel is decorated, at import, so it is read once at import: setting it later changes nothing.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# The fusion kernels' limits, here (no triton import) so that a config check can read them on any platform.
FUSION_MAX_MODALITIES = 16
FUSION_MAX_QUERIES = 64

# The torch.library namespace of the custom ops: "terrafm" for this package (torch.ops.terrafm.<op>), the copy's own
# package name for a copy of the folder, so two copies in one process do not replace each other's ops.
OP_NAMESPACE = "terrafm" if __package__ == "terrafm_kernels" else __package__.replace(".", "_")


def op_name(name: str) -> str:
    """The qualified name of custom op `name` in this package's namespace."""
    return f"{OP_NAMESPACE}::{name}"


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_DTYPE = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def _shape_of(x):
    """A tensor's shape and dtype as a contiguous meta tensor (float64 as float32), anything else as it is; a 0-d
    tensor too (a temperature: the checks read its value, and refused it as a meta tensor that has none)."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return x
    return torch.empty(x.shape, dtype=torch.float32 if x.dtype == torch.float64 else x.dtype, device="meta")


def checked_reference(validate, reference_fn):
    """reference_fn behind a kernel's input checks (the reference alone failed deep inside torch on a wrong shape,
    or returned NaN for a temperature of 0), so a bad input is the same error on the cpu as on a GPU. validate
    sees the tensors' shapes and dtypes on the meta device: the kernels' own limits (cuda tensors, contiguity, no
    float64) do not bind the reference; their one-device check does (check_device, on the real tensors: a module
    on cuda fed cpu inputs failed inside torch). A partial of module-level functions, not a closure: modules keep
    it as an attribute, and torch.save / pickle of a module (or DINOLoss) must not fail on it."""
    names = tuple(inspect.signature(reference_fn).parameters)  # read here, not in each (maybe compiled) call
    return functools.partial(_call_checked, validate, reference_fn, names)


def _call_checked(validate, reference_fn, names, *args, **kwargs):
    validate(*map(_shape_of, args), **{k: _shape_of(v) for k, v in kwargs.items()})
    # every tensor argument on the first one's device, named by the reference's parameter; a 0-d tensor (a
    # temperature) may be on the cpu, as torch's own ops allow
    tensors = [(name, value) for name, value in (*zip(names, args, strict=False), *kwargs.items())
               if isinstance(value, torch.Tensor) and value.dim() > 0]
    for name, value in tensors[1:]:
        check_device(name, value, tensors[0][1].device, f"{tensors[0][0]} is")
    return reference_fn(*args, **kwargs)


def no_second_derivative(backward_op, name: str) -> None:
    """Give a kernel's backward custom op an autograd that refuses a second backward by name: torch's own error
    ("no autograd formula was registered. Please use register_autograd") read as a bug to fix in the library."""
    def refuse(ctx, *grads):
        raise RuntimeError(f"{name}: the fused kernel's gradient is not differentiable again (a second backward "
                           f"through create_graph=True, e.g. a gradient penalty); use "
                           f"terrafm_kernels.reference.{name} where second derivatives are needed")

    backward_op.register_autograd(refuse, setup_context=lambda ctx, inputs, output: None)


def check_interpreted_dot_dtype(name: str, x: torch.Tensor) -> None:
    """The interpreter computes bf16 tl.dot wrongly (errors of 1e11 on unit inputs): refuse it there rather than
    return garbage; bf16 is proven on a GPU (gpu_check)."""
    if INTERPRET and x.dtype == torch.bfloat16 and x.device.type == "cpu":
        raise TypeError(f"{name} is bfloat16 under TRITON_INTERPRET=1, whose tl.dot gets bf16 wrong; use float16 "
                        "or float32 on the cpu (bf16 runs on a GPU)")


def interpreted(tensor: torch.Tensor) -> bool:
    """True when the kernel runs in the Triton interpreter (CPU tensors, TRITON_INTERPRET=1)."""
    return tensor.device.type == "cpu" or INTERPRET


def check_tensor(name: str, x: torch.Tensor, ndim: int | None, device: torch.device | None = None,
                 dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES, shape: tuple[int, ...] | None = None) -> None:
    """The one input check of every kernel: raise a ValueError/TypeError naming `name` unless x is a
    dense float tensor of ndim dims (at least one when ndim is None; of `shape` when given) on a device the
    kernels run on (cuda, or cpu under the interpreter; meta tensors get output shapes from the ops' fake
    implementations, as torch ops do), on `device` when given. Contiguity is check_contiguous's, after the shape
    checks: a wrongly shaped slice is a shape error on every path, not "must be contiguous" on the kernel's only."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_nested or x.layout != torch.strided:  # sparse, nested, mkldnn: no plain strided storage to point into
        kind, fix = ("nested", "pad or unbind it") if x.is_nested else (str(x.layout)[6:], "call .to_dense()")
        raise TypeError(f"{name} must be a dense (torch.strided) tensor, got a {kind} tensor; {fix} first")
    if ndim is None and x.dim() == 0:
        raise ValueError(f"{name} must have at least 1 dimension, got a 0-d tensor")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    check_dtype(name, x, dtypes)
    if device is not None:
        check_device(name, x, device)
    if x.device.type not in ("cuda", "cpu", "meta"):
        raise ValueError(f"{name} must be on a cuda device (or cpu under TRITON_INTERPRET=1), got {x.device}")
    if x.device.type == "cpu" and not INTERPRET:
        raise ValueError(f"{name} is on the cpu: the Triton kernels need cuda tensors, or TRITON_INTERPRET=1 "
                         "set before triton is imported (tests); on cpu use terrafm_kernels.reference (the op "
                         "registry's torch backend)")


def check_contiguous(**tensors: torch.Tensor | None) -> None:
    """A ValueError naming the first of `tensors` (name=tensor; None skipped) that is not contiguous: the kernels
    index them by shape, and a launcher copies only what it says it copies. Called after the shape checks."""
    for name, x in tensors.items():
        if x is not None and not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous() first); got strides {x.stride()}")


def check_dtype(name: str, x: torch.Tensor, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    """check_tensor's dtype check: a TypeError naming `name` unless x.dtype is one of dtypes; a float64 tensor is
    told where float64 runs (the kernels compute in fp32 at most)."""
    if x.dtype not in dtypes:
        where = ("; the kernels compute in float32 at most: for float64 (e.g. torch.autograd.gradcheck) use "
                 "terrafm_kernels.reference, the pure-PyTorch spec functions, which take it"
                 if x.dtype == torch.float64 else "")
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}{where}")


def check_device(name: str, x: torch.Tensor, device: torch.device, others: str = "the other inputs are") -> None:
    """check_tensor's device check: a ValueError naming `name` and both devices unless x is on `device`, the device
    of `others` (a phrase with its verb: "the other inputs are", "student_global is"). It offers both moves: a
    module's parameters or buffers are as likely to be on the wrong device as the inputs."""
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but {others} on {device}: move the module (.to(device)) or "
                         "the inputs so that all are on one device")


def check_patch_grid(height: int, width: int, patch: int) -> None:
    """Every backend refuses an image that is not a whole number of patches (none silently crops)."""
    if patch < 1:
        raise ValueError(f"the patch size p of weight (E, C, p, p) must be >= 1, got {patch}")
    if height < 1 or width < 1:
        raise ValueError(f"image size {height}x{width} has no pixels; an image is at least one patch ({patch}x{patch})")
    if height % patch or width % patch:
        fit = f"{-(-height // patch) * patch}x{-(-width // patch) * patch} or {height // patch * patch}x" \
              f"{width // patch * patch}"
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch}; resize or crop "
                         f"the images to a multiple of {patch} (e.g. {fit}) first")


def check_head_loss_shapes(student_features, teacher_features, weight_v, weight_g, center, center_high, high_weight,
                           teacher_weight_v=None, teacher_weight_g=None) -> None:
    """dino_head_loss shape checks shared by every backend: errors name the argument and the expected shape."""
    for name, x, ndim, layout in (("student_features", student_features, 3, "(S, B, D)"),
                                  ("teacher_features", teacher_features, 3, "(T, B, D)"),
                                  ("weight_v", weight_v, 2, "(K, D)")):
        if not isinstance(x, torch.Tensor) or x.dim() != ndim:
            got = getattr(x, "shape", type(x).__name__)
            raise ValueError(f"{name} must have {ndim} dimensions {layout}, got {got}")
    if teacher_weight_g is not None and teacher_weight_v is None:
        raise ValueError("teacher_weight_g is given without teacher_weight_v: the teacher side would use the student's "
                         "weight_v and weight_g and ignore it; pass the teacher's weight_v too, or neither")
    S, B, D = student_features.shape
    T = teacher_features.shape[0]
    K = weight_v.shape[0]
    if B == 0 or S == 0 or T == 0:
        raise ValueError(f"dino_head_loss needs at least one sample and view: student_features (S, B, D) = "
                         f"{tuple(student_features.shape)}, teacher_features (T, B, D) = "
                         f"{tuple(teacher_features.shape)}")
    if K == 0 or D == 0:
        raise ValueError(f"weight_v (K, D) = {tuple(weight_v.shape)} must have at least one prototype and feature")
    if tuple(teacher_features.shape[1:]) != (B, D):
        raise ValueError(f"teacher_features (T, B, D) = {tuple(teacher_features.shape)} must match "
                         f"student_features (S, B, D) = {tuple(student_features.shape)} in B and D")
    if weight_v.shape[1] != D:
        raise ValueError(f"weight_v (K, D) = {tuple(weight_v.shape)} must have D={D} like the features")
    if teacher_weight_v is not None and tuple(teacher_weight_v.shape) != tuple(weight_v.shape):
        raise ValueError(f"teacher_weight_v {tuple(teacher_weight_v.shape)} must match weight_v "
                         f"{tuple(weight_v.shape)}")
    for name, g in (("weight_g", weight_g), ("teacher_weight_g", teacher_weight_g)):
        if g is not None and (not isinstance(g, torch.Tensor) or tuple(g.shape) != (K, 1)):
            raise ValueError(f"{name} must be None or a (K, 1) = ({K}, 1) tensor (the weight-norm gain of each "
                             f"prototype), got {getattr(g, 'shape', type(g).__name__)}")
    for name, x in (("center", center), ("center_high", center_high)):
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (K,):
            raise ValueError(f"{name} must have K={K} entries, one per prototype of weight_v, "
                             f"got shape {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(high_weight, torch.Tensor) or tuple(high_weight.shape) != (T * B,):
        raise ValueError(f"high_weight must have T*B={T * B} entries, one per teacher row, got shape "
                         f"{getattr(high_weight, 'shape', type(high_weight).__name__)}")
    if T * S - min(S, T) == 0:
        raise ValueError(f"dino_head_loss needs at least one pair of different views; got S={S}, T={T}")


def _check_number(name: str, value) -> None:
    """A real number (Python, numpy or symbolic scalar, or a one-element real tensor), not a bool."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt, torch.Tensor)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
    if isinstance(value, torch.Tensor) and (value.dtype == torch.bool or value.is_complex()):
        raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor")
    if isinstance(value, torch.Tensor) and value.is_meta:
        raise ValueError(f"{name} must have a value: a meta tensor has none (pass a float or a CPU/CUDA tensor)")


def scalar_input(value) -> torch.Tensor:
    """A temperature as the custom ops take it: a 0-d float64 CPU tensor, which torch.compile traces as a graph
    input. A float argument of a custom op is specialised instead, one graph per value, so a DINO temperature
    warm-up recompiled every step until torch's recompile limit sent the step back to eager. The multiply (not
    torch.tensor or scalar_tensor) is what torch.compile turns a symbolic float into without specialising it."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64).reshape(())
    return torch.ones((), dtype=torch.float64).mul(value)


FLOAT32_TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32, 1.18e-38


def check_positive(name: str, value: float) -> None:
    """A temperature or scale: a finite number > 0 (inf would turn the softmax into NaN), and a normal float32
    (the kernels divide by it in fp32: below 1.18e-38 its reciprocal is inf and every probability NaN).
    Plain comparisons (NaN fails them), not math.isfinite: torch.compile traces those when a temperature
    schedule makes the value a symbolic float, where math.isfinite broke the graph (fullgraph=True raised)."""
    _check_number(name, value)
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be > 0 and finite, got {value}")
    if value < FLOAT32_TINY:
        raise ValueError(f"{name} must be at least {FLOAT32_TINY:.3g} (its float32 reciprocal overflows below), "
                         f"got {value}")


def check_unit_interval(name: str, value: float, what: str = "") -> None:
    """A momentum or blend weight: a number in [0, 1] (NaN refused)."""
    _check_number(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1]{what}, got {value}")


def check_alpha(alpha: float) -> None:
    check_unit_interval("alpha", alpha, " (weight of the plain centre)")


def check_size(name: str, value: int, minimum: int = 1) -> None:
    """A count or width (patch size, heads, dims): an int >= minimum; bools are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def num_splits(K: int, programs: int, block_k: int, target_programs: int) -> tuple[int, int]:
    """Split K so that programs * splits reaches target_programs; returns (splits, K per split).

    K per split is a multiple of block_k and every split is non-empty.
    """
    wanted = max(1, min(_cdiv(target_programs, max(programs, 1)), _cdiv(K, block_k)))
    per_split = _cdiv(_cdiv(K, wanted), block_k) * block_k
    return _cdiv(K, per_split), per_split


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def sm_count(device: torch.device) -> int:
    """SMs of a CUDA device (asked once per device), 4 for the interpreter's CPU tensors."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# Efficiency counts (compile report, docs/kernels.md "Efficiency counts"): every op file has an
# efficiency(kernel, ...) next to its launcher that walks the launcher's own grid and tiles.
def programs(grid: tuple[int, ...]):
    """Program ids in launch order (axis 0 fastest), as the hardware schedules them."""
    g0, g1, g2 = (tuple(grid) + (1, 1))[:3]
    for z in range(g2):
        for y in range(g1):
            for x in range(g0):
                yield x, y, z


def hbm_bytes(grid: tuple[int, ...], touches, tensor_bytes: dict[str, int], concurrent: int, l2_bytes: int) -> int:
    """Bytes one launch moves to or from HBM, by the wave model.

    touches(x, y, z) lists (tensor, tile key, bytes) for every region the program loads or stores.
    Programs run in waves of `concurrent` (SMs x CTAs per SM) in launch order; a tile touched by
    several programs of one wave (or twice by one program) is moved once per wave, as L2 serves the
    repeats. A tensor no larger than half of L2 stays there for the whole launch: each of its tiles
    is moved once per launch.
    """
    resident = {name for name, size in tensor_bytes.items() if size <= l2_bytes // 2}
    once, wave, total = set(), set(), 0
    for i, pid in enumerate(programs(grid)):
        if i % concurrent == 0:
            wave = set()
        for tensor, key, nbytes in touches(*pid):
            seen = once if tensor in resident else wave
            if (tensor, key) not in seen:
                seen.add((tensor, key))
                total += nbytes
    return total


def l2_serves_reread(streamed_between: int, l2_bytes: int) -> bool:
    """Whether L2 still holds a tile when the program that read it reads it again: under LRU only while the bytes
    that every resident program streams between the two reads fit in L2 (a larger cyclic stream misses every tile).
    For kernels whose second pass over their own tiles hbm_bytes' in-wave credit would count as free."""
    return streamed_between <= l2_bytes


# Samples per GPU of the presets (terrafm/configs/vit{b,l}_{h100,a100}.yaml, data.batch_size) by the GPU's compute
# capability: the compile report costs each kernel at the calls those presets make on that GPU.
PRESET_SAMPLES = {90: {"base": 64, "large": 32}, 80: {"base": 32, "large": 16}}


def at_presets(efficiency, shape, **fixed):
    """A compile spec's `efficiency`: efficiency(**fixed, **shape(samples), sms=, concurrent=, l2_bytes=) with
    samples = PRESET_SAMPLES[capability], so each GPU's rows count the calls its own presets make."""
    def counts(sms: int, concurrent: int, l2_bytes: int, capability: int) -> dict:
        return efficiency(**fixed, **shape(PRESET_SAMPLES[capability]), sms=sms, concurrent=concurrent,
                          l2_bytes=l2_bytes)
    return counts


def aligned_at_production(signature: dict[str, str], multiples_of_16: tuple[str, ...]) -> tuple[str, ...]:
    """The arguments the JIT specializes as divisible by 16 at the presets' shapes (the compile report compiles
    that variant): every pointer (torch's allocations, and views of them offset by whole rows of 16-multiple
    widths) and the integers the module names. Vector loads and cheaper addresses follow from it."""
    return tuple(name for name, kind in signature.items() if kind.startswith("*") or name in multiples_of_16)


def pad(n: int, block: int) -> int:
    """n rounded up to whole tiles: what a masked tile loop executes."""
    return _cdiv(n, block) * block


# Tensor descriptors (TMA on sm_90; triton lowers the same loads to masked loads below sm_90 and in the
# interpreter), for kernels that read 2-D operands through tl.make_tensor_descriptor.
def descriptor_operand(t: torch.Tensor) -> torch.Tensor:
    """t (rows, cols) as a tensor descriptor takes it: a 16-byte aligned base and row stride. That is t
    itself when its rows are a multiple of 16 bytes (D = 256); otherwise a copy with its rows padded to
    16 bytes (the descriptor's shape stops at cols, so the padding is never read)."""
    step = 16 // t.element_size()
    if t.is_contiguous() and t.data_ptr() % 16 == 0 and t.shape[1] % step == 0:
        return t
    padded = t.new_zeros(t.shape[0], pad(t.shape[1], step))
    padded[:, :t.shape[1]] = t
    return padded


def _descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the tensor descriptors a kernel builds on sm_90 (triton asks for 128 bytes a program),
    on the current device: launch_kernel() makes it the operands'."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _release(version: str) -> tuple[int, ...]:
    """The leading numeric parts of a version string: '3.6.0+git1a2b' -> (3, 6, 0)."""
    parts = []
    for part in version.split("+")[0].split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why triton's interpreter cannot run these kernels with these versions, or None. triton 3.6's interpreter
    takes int() of a one-element array for a loop bound computed from tl.program_id, which numpy 2.4 refuses:
    every kernel then failed with "only 0-dimensional arrays can be converted to Python scalars"."""
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run these kernels with numpy "
                f"{numpy_version}: it converts one-element arrays to ints, which numpy 2.4 refuses; install "
                "numpy<2.4 or triton>=3.7")
    return None


def launch_kernel(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) on the device of its first tensor argument, with triton's scratch allocator set.

    Triton launches on the *current* CUDA device, so operands on cuda:1 while cuda:0 is current (a model spread
    over GPUs in one process, e.g. device_map="auto") would run on the wrong GPU; the guard switches to theirs.
    tl.make_tensor_descriptor needs the allocator on sm_90; triton keeps it in a ContextVar that a new thread
    (autograd's backward thread) does not inherit, so it is set at each launch."""
    import triton

    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    if device.type == "cpu":  # the interpreter
        import numpy

        problem = interpreter_problem(triton.__version__, numpy.__version__)
        if problem:
            raise RuntimeError(problem)
    triton.set_allocator(_descriptor_scratch)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](*args, **kwargs)
