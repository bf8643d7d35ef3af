"""How a backend executes: the typed configuration the per-machine search chooses, and how it is applied.

An ``ExecutionConfig`` holds every setting that changes a framework's speed
but not what it computes (the correctness gate of compare.tune checks that):

* process-level, read when the framework loads, so the runner puts them in
  the worker's environment (``process_env``): TensorFlow's oneDNN switch
  (``TF_ENABLE_ONEDNN_OPTS``) and the glibc malloc tuning (``MALLOC_TUNING``);
* in-process, applied by the backend's ``setup()`` / ``attach_data()``: the
  execution mode, torch's memory format, the inter-op thread pool and
  tf.data's private thread pool.

Every backend reads each of them back from the framework (fairness audit,
run manifest). Intra-op threads are not part of it: both frameworks get the
same count (``RunSpec.threads``), an audited must-match setting.

``--mode auto`` (the default) takes the configuration that compare.tune
measured on this machine; ``FALLBACK`` is used where no search ran (``--mode
best``, a pinned mode, a run too short for a search to pay off).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, MutableMapping

from common.errors import ConfigError

ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"  # read by TensorFlow once, when it loads
# Host allocator tuning (glibc mallopt through the environment). glibc's defaults hand big freed
# blocks back to the kernel (munmap / heap trim), so a training step that frees and re-allocates
# the same buffers page-faults them in again; keeping freed memory in the process is what the
# PyTorch CPU tuning guide gets from jemalloc or tcmalloc, without a new dependency. Whether it
# helps a framework on a machine is measured by the search (a dimension of it); other libcs ignore these.
MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
# Variables that limit the instruction set the math libraries use (how an AVX2-only CPU is emulated
# on a newer one); they change kernel choice, so they are part of the machine fingerprint too.
ISA_LIMIT_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


@dataclass(frozen=True)
class ExecutionConfig:
    """One backend's execution configuration; ``None`` fields mean "the framework's own default"."""

    mode: str  # torch: eager | compile; tensorflow: eager | graph | xla; keras-torch: eager | jit_compile;
    #            "best": the backend's FALLBACK_MODE
    channels_last: bool | None = None  # torch memory format; None: not applicable (TensorFlow computes NHWC)
    onednn: bool | None = None  # TF_ENABLE_ONEDNN_OPTS=1/0; None: environment untouched (TF decides per CPU)
    malloc_tuning: bool = True  # MALLOC_TUNING in the worker's environment; False: libc defaults
    inter_op_threads: int | None = None  # inter-op pool size; None: the framework's default (one per core)
    data_threads: int | None = None  # tf.data private thread pool; None: tf.data's shared default pool
    source: str = field(default="", compare=False)  # how it was chosen (auto search, cache, pinned, fallback)

    def __post_init__(self) -> None:
        for name in ("inter_op_threads", "data_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")

    def label(self) -> str:
        """Short human-readable form, e.g. 'graph onednn=on malloc=tuned inter=2 data=default'."""
        words = [self.mode]
        if self.channels_last is not None:
            words.append(f"cl={'on' if self.channels_last else 'off'}")
        words.append(f"onednn={_switch(self.onednn)}")
        words.append(f"malloc={'tuned' if self.malloc_tuning else 'libc'}")
        words.append(f"inter={self.inter_op_threads or 'default'}")
        words.append(f"data={self.data_threads or 'default'}")
        return " ".join(words)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "ExecutionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def replace(self, **changes: Any) -> "ExecutionConfig":
        return dataclasses.replace(self, **changes)


def _switch(value: bool | None) -> str:
    return "default" if value is None else ("on" if value else "off")


# What runs where no search chose: the configurations benchmarks/mode_matrix.py (modes, memory
# format), benchmarks/threads.py (thread pools) and benchmarks/tune_check.py (every dimension)
# found fastest on the development machine; their CSVs and the README give the figures. The
# mode "best" is resolved per device type by the backend (FALLBACK_MODE in each backend.py).
# oneDNN on: TensorFlow turns it on by itself only on CPUs with AVX-512-class features; on others
# (AVX2) leaving it off was the largest single loss the search was built to find (README).
FALLBACK = {
    "torch": ExecutionConfig("best", channels_last=True, malloc_tuning=True, inter_op_threads=1),
    "tensorflow": ExecutionConfig("best", onednn=True, malloc_tuning=True, inter_op_threads=2),
    # Keras on PyTorch: torch's process (its allocator and inter-op pool, torch's reasons); the layout is
    # Keras's NHWC (channels_last does not apply), oneDNN is torch's own switch (not an environment variable)
    "keras-torch": ExecutionConfig("best", malloc_tuning=True, inter_op_threads=1),
}
# Each framework as a user gets it without tuning: the search starts here, and the report shows
# how far this is from the configuration chosen. TensorFlow: Keras's own default on the CPU is a
# tf.function graph (jit_compile="auto" turns XLA on only with a GPU).
FRAMEWORK_DEFAULT = {
    "torch": ExecutionConfig("eager", channels_last=False, malloc_tuning=False),
    "tensorflow": ExecutionConfig("graph", malloc_tuning=False),
    "keras-torch": ExecutionConfig("eager", malloc_tuning=False),  # jit_compile="auto" is off on torch
}
_GENERIC_FALLBACK = ExecutionConfig("best")  # test backends registered through the registry's variable


def fallback(backend: str) -> ExecutionConfig:
    """The fixed configuration of ``backend`` used where no search chose one."""
    return FALLBACK.get(backend, _GENERIC_FALLBACK)


def requested(spec: Any) -> ExecutionConfig:
    """The configuration a worker applies for ``spec`` (a RunSpec).

    ``spec.execution`` when the parent resolved one (auto search, cache, pin);
    otherwise the fallback with the spec's own pinned mode and memory format
    (a RunSpec built directly, as the benchmarks and tests do).
    """
    if getattr(spec, "execution", None) is not None:
        return spec.execution
    config = fallback(spec.backend)
    mode = spec.mode if spec.mode not in ("auto", "best") else config.mode
    channels_last = config.channels_last if spec.channels_last is None else bool(spec.channels_last)
    source = "pinned" if spec.mode not in ("auto", "best") else "fallback"
    return config.replace(mode=mode, channels_last=channels_last, source=source)


def process_env(config: ExecutionConfig | None, environ: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Apply the process-level parts of ``config`` to ``environ`` (a worker's environment) in place.

    oneDNN: set to 1/0 when the config says so, left as the user had it when
    None. Malloc tuning: the variables are added (a value the user set is
    kept) or, when off, removed, so the worker runs on libc defaults.
    ``None`` applies the fallback's process-level parts.
    """
    config = config or FALLBACK["tensorflow"]
    if config.onednn is not None:
        environ[ONEDNN_ENV] = "1" if config.onednn else "0"
    for name, value in MALLOC_TUNING.items():
        if config.malloc_tuning:
            environ.setdefault(name, value)
        else:
            environ.pop(name, None)
    return environ


def allocator_setting(environ: Mapping[str, str]) -> str:
    """The host allocator tuning a process started with, as the audit shows it."""
    tuned = [f"{name}={environ[name]}" for name in MALLOC_TUNING if name in environ]
    return " ".join(tuned) if tuned else "libc defaults"
