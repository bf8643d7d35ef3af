"""Framework-free core of dualbench: config, registry, data, sampler, schedules,
init, weights layout, the timed loop, metrics and the results schema.

Imports numpy and the standard library only, never torch or tensorflow.
"""
