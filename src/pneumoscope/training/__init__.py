"""Training, the only package that imports Lightning: fit (a run, step by step), module (the
LightningModule, loss, optimiser, schedule, data module), callbacks, environment (processes, devices)."""
