"""``--mode auto``: give every RunSpec its execution configuration, in the parent, before any run starts.

Per (backend, model, device, precision, batch size, threads, pins), in this order:

* a pinned mode (``--mode torch=compile``) or ``--mode best``: no search, the
  fallback configuration with the pins (``common.execution.requested``);
* a cached search result for this machine fingerprint (compare.tune_cache),
  unless ``--retune``;
* a new search (compare.tune) when it can pay off: ``--retune``, ``dualbench
  tune``, or a run that trains at least ``AUTO_SEARCH_MIN_STEPS`` steps per
  backend and model; its result is cached;
* otherwise the fallback, and the record says why (a smoke run or a short
  bench sweep does not pay for a search: `dualbench tune` does it once).

Every spec leaves with ``execution`` set and ``execution.source`` saying which
of these happened; the records go to the results folder and the report.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any, Callable

from common.config import RunSpec
from common.execution import ExecutionConfig, requested
from compare.tune import DEFAULT_BUDGET_S, GATE_STEPS, RESERVE_FRACTION, TIMED_STEPS, WARMUP_STEPS, Search
from compare.tune_cache import TuningCache

# A search costs about ten candidate processes (start-up, compile, a dozen steps each) per backend
# and model: a few hundred training steps' worth of time. A run shorter than this cannot win it back.
AUTO_SEARCH_MIN_STEPS = 500


def planned_steps(spec: RunSpec, num_train: int, seeds: int) -> int:
    """Training steps one (backend, model) will run: epochs x steps per epoch x seeds."""
    batch = spec.recipe.batch_size
    per_epoch = num_train // batch if spec.recipe.drop_last else -(-num_train // batch)
    if spec.max_steps_per_epoch:
        per_epoch = min(per_epoch, spec.max_steps_per_epoch)
    return spec.recipe.epochs * per_epoch * seeds


def _pins(spec: RunSpec) -> dict[str, Any]:
    # the memory format is torch's own; TensorFlow and Keras on PyTorch compute NHWC
    no_layout = spec.channels_last is None or spec.backend in ("tensorflow", "keras-torch")
    return {} if no_layout else {"channels_last": spec.channels_last}


def search_key(spec: RunSpec, dataset: Any, *, with_model: bool = True) -> str:
    """What a cached search result is valid for (within one machine fingerprint)."""
    shape = "x".join(map(str, dataset.in_shape)) + f"/{dataset.num_classes}"
    pins = ",".join(f"{k}={v}" for k, v in sorted(_pins(spec).items())) or "-"
    parts = [spec.backend, spec.model if with_model else "*", spec.device, spec.precision,
             f"b{spec.recipe.batch_size}", f"threads={spec.threads or 'all'}", shape, f"pins={pins}",
             f"det={spec.deterministic}", f"tf32={spec.allow_tf32}"]
    return "|".join(parts)


def candidate_spec(spec: RunSpec, dataset: Any) -> RunSpec:
    """The spec every candidate of ``spec``'s search measures: one epoch on just enough images.

    Dropout off: eager and compiled code draw different dropout masks, which
    the gate would take for a wrong result (dropout costs one elementwise op).
    The gate's evaluation batch is one training batch (the same compiled eval
    code as the run's, at a quarter of the default 500 images' cost).
    """
    batch = spec.recipe.batch_size
    needed = max(batch * (GATE_STEPS + WARMUP_STEPS + TIMED_STEPS + 2), dataset.num_classes)
    n_train, n_test = len(dataset.train_labels), len(dataset.test_labels)
    train_subset = needed if needed < n_train else spec.train_subset
    eval_batch = min(batch, n_test)
    test_subset = max(eval_batch, dataset.num_classes) if eval_batch < n_test else spec.test_subset
    return replace(spec, mode="auto", style="custom", execution=None, checkpoint_dir=None, max_steps_per_epoch=None,
                   train_subset=train_subset, test_subset=test_subset,
                   recipe=replace(spec.recipe, epochs=1, dropout=0.0, eval_batch_size=eval_batch))


class Resolver:
    """Resolves specs against the cache, searching where it pays; keeps a record per search key."""

    def __init__(self, dataset: Any, *, retune: bool = False, search_if_missing: bool = False,
                 budget_s: float = DEFAULT_BUDGET_S, cache: TuningCache | None = None, quick: bool = False,
                 complete_partial: bool = False,
                 search_factory: Callable[..., Search] = Search,
                 log: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)):
        self.dataset, self.retune, self.search_if_missing = dataset, retune, search_if_missing
        self.budget_s, self.quick, self.log = budget_s, quick, log
        self.complete_partial = complete_partial  # dualbench tune: redo a search its budget cut short
        self.planned = 0  # searches this command will run (plan()): the budget is shared among them
        self.spent_s = 0.0  # seconds the searches so far took
        self.cache = cache if cache is not None else TuningCache()
        self.search_factory = search_factory
        self.records: dict[str, dict[str, Any]] = {}  # search key -> resolution record
        self.searches = 0

    def resolve(self, specs: list[RunSpec]) -> list[RunSpec]:
        """``specs`` with ``execution`` set (see the module docstring)."""
        self.plan(specs)
        return [self.resolve_one(spec) for spec in specs]

    def plan(self, specs: list[RunSpec]) -> int:
        """Count the searches resolving ``specs`` will run: ``budget_s`` is the command's, shared among them."""
        keys = {search_key(s, self.dataset) for s in specs if s.execution is None and s.mode == "auto"}
        self.planned = sum(self._will_search(key) for key in keys if key not in self.records)
        return self.planned

    def _usable_cache(self, key: str) -> dict[str, Any] | None:
        cached = None if self.retune else self.cache.get(key)
        # a search the budget cut short is used by runs (they never pay for a search twice); `dualbench tune`
        # searches it again
        if cached and cached.get("choice") and (cached.get("complete", True) or not self.complete_partial):
            return cached
        return None

    def _will_search(self, key: str) -> bool:
        return self._usable_cache(key) is None and (self.retune or self.search_if_missing)

    def resolve_one(self, spec: RunSpec) -> RunSpec:
        if spec.execution is not None:
            return spec
        if spec.mode != "auto":
            source = "fallback (--mode best)" if spec.mode == "best" else f"pinned (--mode {spec.backend}={spec.mode})"
            config = requested(spec).replace(source=source)
            self._note(spec, source, config, None)
            return replace(spec, execution=config)
        key = search_key(spec, self.dataset)
        if key not in self.records:
            self.records[key] = self._decide(spec, key)
        config = self.records[key]["config"]
        return replace(spec, execution=config)

    def _decide(self, spec: RunSpec, key: str) -> dict[str, Any]:
        cached = self._usable_cache(key)
        if cached:
            config = _config(cached["choice"], f"auto: cached search of {cached.get('searched_utc', '?')}")
            return self._note(spec, "cache", config, cached)
        if not (self.retune or self.search_if_missing):
            why = ("auto: no search result cached for this machine and the run is too short to pay for one; "
                   "fallback used (`dualbench tune` or --retune searches)")
            return self._note(spec, "fallback", requested(replace(spec, mode="best")).replace(source=why), None)
        record = self._search(spec, key)
        if not record.get("choice"):
            why = f"auto: search failed ({record.get('note')}); fallback used"
            return self._note(spec, "fallback", requested(replace(spec, mode="best")).replace(source=why), record)
        self.cache.put(key, record)
        config = _config(record["choice"], f"auto: searched {record['searched_utc']}")
        return self._note(spec, "searched", config, record)

    def _search(self, spec: RunSpec, key: str) -> dict[str, Any]:
        inherited = self._inherited(spec, key)
        self.log(f"tuning {spec.backend} / {spec.model} ({spec.precision}, batch {spec.recipe.batch_size}): "
                 f"measuring execution configurations (process-level settings one process each, execution modes "
                 f"side by side in one)"
                 + (f" (machine-level settings from {inherited[1]})" if inherited else ""))
        # this search's share of what the command's budget has left: all of it but RESERVE_FRACTION of the
        # budget for each search still to run after it, and never less than an equal split
        left, after = max(self.budget_s - self.spent_s, 0.0), max(self.planned - self.searches - 1, 0)
        budget = max(left - RESERVE_FRACTION * self.budget_s * after, left / (after + 1))
        search = self.search_factory(candidate_spec(spec, self.dataset), budget_s=budget,
                                     inherited=inherited[0] if inherited else None, pins=_pins(spec),
                                     quick=self.quick, log=self.log)
        self.searches += 1
        record = search.run()
        self.spent_s += float(record.get("elapsed_s") or 0.0)
        record["key"] = key
        if not record.get("complete", True):
            skipped = sum(row["status"] == "skipped" for row in record["rows"])
            self.log(f"tuning {spec.backend} / {spec.model}: its {budget:.0f} s share of the budget ran out with {skipped} "
                     "candidate(s) untried, in the order of expected effect (the last ones matter least); runs use "
                     "the choice, `dualbench tune --tune-budget-s S` with a larger S searches them all")
        return record

    def _inherited(self, spec: RunSpec, key: str) -> tuple[Any, str] | None:
        """An earlier search's choice for another model of the same backend/device/precision/batch."""
        same = search_key(spec, self.dataset, with_model=False).split("|")
        sources = [(k, r.get("search")) for k, r in self.records.items()]
        sources += [] if self.retune else list(self.cache.entries().items())
        for other_key, record in sources:
            parts = other_key.split("|")
            if other_key != key and record and record.get("choice") and parts[:1] + parts[2:] == same[:1] + same[2:]:
                return _config(record["choice"], ""), record.get("model", parts[1])
        return None

    def _note(self, spec: RunSpec, how: str, config: Any, search: dict[str, Any] | None) -> dict[str, Any]:
        record = {"backend": spec.backend, "model": spec.model, "how": how, "config": config,
                  "label": config.label(), "source": config.source, "search": search}
        if spec.mode != "auto":
            self.records.setdefault(f"{spec.backend}|{spec.model}|{spec.mode}", record)
        return record

    def summary(self) -> list[dict[str, Any]]:
        """JSON-ready records: one per (backend, model, ...) resolved (for tuning.json and the report)."""
        return [{**{k: v for k, v in r.items() if k != "config"}, "config": r["config"].to_dict()}
                for r in self.records.values()]


def _config(raw: dict[str, Any], source: str) -> ExecutionConfig:
    return ExecutionConfig.from_dict(raw).replace(source=source)
