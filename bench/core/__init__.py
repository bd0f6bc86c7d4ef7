"""The core: sampler math, closed forms, registries, errors, caches, and the contracts (Backbone,
Task, Reward, AlignmentMethod, metrics' PromptSamples/EvalContext). Imports nothing above it."""
