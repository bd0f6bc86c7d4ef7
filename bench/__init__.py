"""diffusion-alignment-bench: the harness (CLI, config, runner, diffusion core, tasks)."""
