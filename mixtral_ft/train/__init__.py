"""The train stage: one TRL trainer factory for SFT and DPO, and what runs around it (callbacks, preemption
and NaN guards, resume, router telemetry, plots, run.json)."""
