"""Helpers shared by the benchmark sections: run sizes, timing, peak memory, model pairs, markdown tables.

Every section module has `run(mode) -> dict` (mode: "full" | "quick" | "smoke") returning
{"config": {...}, "rows": [...], ...} and `render(result) -> str` (its markdown tables and verdicts).
`benchmarks/run.py` runs them all in one process and regenerates BENCHMARKS.md.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import resource
import socket
import statistics
import threading
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
FIXTURE_TOKENIZER = Path(__file__).resolve().parents[2] / "shared/fixtures/models/tiny-tied"
MODES = ("full", "quick", "smoke")

# The LLM used for LLM comparisons: Qwen3-0.6B's shape (random weights); sections change the layer count.
QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)


# A tiny shape for smoke runs of the LLM sections.
SMOKE_LLM = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 vocab_size=1024)  # > the fixture tokenizer's 832 ids


def pick(mode: str, full, quick, smoke=None):
    """The value for this run size (smoke defaults to quick's)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return {"full": full, "quick": quick, "smoke": quick if smoke is None else smoke}[mode]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn: Callable, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable], repeat: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each fn, run round-robin (a, b, a, b, ...) so that load from other processes on
    this shared machine hits all of them alike: their ratios are what the tables quote."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; elsewhere the lifetime peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - non-Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc keeps it otherwise), so that a row's peak RSS
    does not include what earlier sections left behind."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMemory:
    """Peak process RSS (a 10 ms sampling thread; getrusage only knows the lifetime peak) and, on CUDA,
    peak allocated GPU memory while the block runs. Everything alive counts, models included."""

    def __enter__(self) -> "PeakMemory":
        release_memory()
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.cuda_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None

    def columns(self) -> dict:
        """Table columns; only after the block has ended."""
        if self._thread.is_alive():
            raise RuntimeError("PeakMemory.columns() called inside its `with` block")
        out = {"peak_rss_gb": self.peak / 1e9}
        if self.cuda_peak is not None:
            out["peak_cuda_gb"] = self.cuda_peak / 1e9
        return out


def machine() -> dict:
    return {"host": socket.gethostname(), "date": str(date.today()), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": cpu_name(), "cores": os.cpu_count(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - non-Linux
        pass
    return platform.processor() or platform.machine()


# ---- model pairs ---------------------------------------------------------------------------------------

def tiny_vision_config():
    """A negligible ViT for LLM-only benchmarks (Ovis needs one)."""
    from ovis25.config import VisionConfig
    return VisionConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def qwen3_pair(layers: int, hf: bool = True, seed: int = 0, **overrides):
    """(transformers Qwen3ForCausalLM or None, our Ovis) holding the same random Qwen3-0.6B-shaped weights
    (`overrides` change the shape, e.g. for smoke tests)."""
    import transformers
    from ovis25.config import OvisConfig, Qwen3Config
    from ovis25.model import Ovis
    torch.manual_seed(seed)
    cfg = dict(QWEN3_06B, num_hidden_layers=layers, **overrides)
    hf_cfg = transformers.Qwen3Config(**cfg, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960,
                                      eos_token_id=None, pad_token_id=0)
    hf_cfg._attn_implementation = "sdpa"
    ref = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    ours = Ovis(OvisConfig(tiny_vision_config(), Qwen3Config(**cfg), 1024)).eval()
    missing = ours.llm.load_state_dict(ref.state_dict(), strict=False)
    assert not missing.missing_keys, missing
    ours.to(device())
    if not hf:
        return None, ours
    return ref.to(device()), ours


def fixture_tokenizer():
    from ovis25.processing import Tokenizer
    return Tokenizer.from_pretrained(FIXTURE_TOKENIZER)


# ---- markdown ------------------------------------------------------------------------------------------

def fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def table(rows: list[dict], columns: list[str] | dict[str, str]) -> str:
    """Markdown table; columns is a list of keys or {key: header}."""
    headers = dict(columns) if isinstance(columns, dict) else {c: c for c in columns}
    if "peak_rss_gb" in headers and any("peak_cuda_gb" in r for r in rows):
        headers["peak_cuda_gb"] = "peak CUDA GB"
    lines = ["| " + " | ".join(headers.values()) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in headers) + " |" for r in rows]
    return "\n".join(lines)


def verdict(met: bool, target: str, why: str = "", parity: bool = False) -> str:
    """One line for a target: met, at parity (missed by less than the noise: say so rather than round it
    up), or missed; with why when not met."""
    label = "met" if met else "at parity, within noise" if parity else "missed"
    return f"**Target {label}:** {target}." + ("" if met or not why else f" Why: {why}")


def one_task_world(path: Path, task: str, questions: int, test: int, seed: int) -> Path:
    """A synthetic world of one task at `path` (built once): `questions` to train on, `test` held out, the task's
    questions also a dataset of their own (`synth_qa_<task>`) -> its path."""
    from ovis25.demo import task_datasets
    from ovis25.synth import build_world
    if not (path / "world.json").exists():
        sizes = {"qa": {task: questions}, "test": {task: test}}
        build_world(path, seed=seed, sizes=sizes, tokenizer=False, progress=True, tasks=[task])
    task_datasets(path)
    return path


def train_lookup(init: Path | str, out: Path, world: Path, datasets: list[str], seed: int) -> Path:
    """One pass of the long preset's look-up recipe (recipes/long/lookup.toml) from `init` over `world`'s
    `datasets`, into `out` unless trained there already -> the final checkpoint."""
    from ovis25.demo import RECIPES
    from ovis25.train import load_recipe, train
    if not (out / "final" / "config.json").exists():
        keys = [f'init="{init}"', f'out_dir="{out}"', f"seed={seed}", f'datainfo="{world / "datainfo.json"}"',
                f"datasets={json.dumps(datasets)}"]
        train(load_recipe(RECIPES.parent / "long" / "lookup.toml", keys))
    return out / "final"
