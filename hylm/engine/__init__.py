"""The engine: state pool, scheduler, runner, sampler, offline API. Speaks token ids only."""
