"""Downstream evaluation (`terrafm eval`): readers (data), frozen features, probes, metrics, runner, CLI."""
