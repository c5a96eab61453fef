"""Data path: shard format and converter, loaders (DALI | C++ | numpy), sampler, multi-crop views."""
