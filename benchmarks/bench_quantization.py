"""What quantization costs and saves on the bundled model: one row per format, same run.

    python3 benchmarks/bench_quantization.py                       # models/hylm-tiny, all formats
    python3 benchmarks/bench_quantization.py --formats bf16,nvfp4 --n 20

Formats: fp32 and bf16 (the checkpoint loaded in that dtype), fp8 / nvfp4 / mixed (`hylm quantize`, ModelOpt
layout; nvfp4+search / mixed+search with `--nvfp4-scales search`), q8_0 / q4_k (`hylm export-gguf`). Each is measured in its own subprocess: weight bytes held by the
model's tensors, resident memory (VmRSS growth while loading, and the whole process's), perplexity on the assistant tokens of held-out
curriculum conversations, and greedy `hylm eval-tasks` accuracy per task (held-out seeds). Prints a markdown
table with each format's mean task accuracy relative to bf16.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "hylm-tiny"
ALL_FORMATS = ("fp32", "bf16", "fp8", "nvfp4", "mixed", "q8_0", "q4_k")
# `FORMAT+search`: the same policy with least-squares NVFP4 block scales (`hylm quantize --nvfp4-scales search`)
SEARCH = "+search"


def prepare(fmt: str, model: Path, work: Path) -> tuple[str, str]:
    """(path to load, dtype to load it in) for one format; writes quantized copies under `work`."""
    if fmt in ("fp32", "bf16"):
        return str(model), fmt
    policy = fmt.removesuffix(SEARCH)
    if policy in ("fp8", "nvfp4", "mixed"):
        out = work / fmt
        extra = ["--nvfp4-scales", "search"] if fmt.endswith(SEARCH) else []
        subprocess.run([sys.executable, "-m", "hylm.cli", "quantize", str(model), str(out), "--format", policy,
                        *extra], check=True, stdout=subprocess.DEVNULL)
        return str(out), "fp32"
    out = work / f"{fmt}.gguf"
    subprocess.run([sys.executable, "-m", "hylm.cli", "export-gguf", str(model), str(out), "--type", fmt],
                   check=True, stdout=subprocess.DEVNULL)
    return str(out), "fp32"


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(path: str, dtype: str, tokenizer_dir: str, n: int, ppl_examples: int) -> dict:
    """Runs inside the subprocess: load, RSS, perplexity, task accuracy."""
    import torch

    import hylm
    from hylm.chat import ChatTemplate, Tokenizer
    from hylm.eval.tasks import build_items, engine_generate, run_items
    from hylm.engine.llm import LLM
    from hylm.train import curriculum

    # one-time start-up memory that is not the model's: the math libraries' buffers, and the modules that
    # building on the meta device imports (~150 MB of Python modules)
    torch.nn.functional.linear(torch.randn(4, 64), torch.randn(64, 64))
    from hylm.config import ModelConfig
    from hylm.model import NemotronHModel

    with torch.device("meta"):
        NemotronHModel(ModelConfig.from_json(Path(tokenizer_dir) / "config.json"))
    rss0 = rss_bytes()
    model = hylm.load_model(path, dtype=dtype)
    rss_total = rss_bytes()
    rss = rss_total - rss0
    weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    tok, tpl = Tokenizer.from_dir(tokenizer_dir), ChatTemplate.from_dir(tokenizer_dir)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in range(ppl_examples):
            ex = curriculum.example_for_seed(curriculum.EVAL_SEED_BASE + 500_000 + i)
            ids, mask = curriculum.render_for_training(ex, tpl, tok)
            logits = model.forward(torch.tensor([ids]))[0, :-1].float()  # [T-1, V]
            target = torch.tensor(ids[1:])
            keep = torch.tensor(mask[1:], dtype=torch.bool)
            nll += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    llm = LLM(model, tokenizer=None, max_num_seqs=16, max_model_len=1024)
    items = build_items(tpl, tok, n=n)
    report = run_items(items, engine_generate(llm, tok))
    return {"weight_bytes": weight_bytes, "rss_bytes": rss, "rss_total_bytes": rss_total, "ppl": math.exp(nll / max(count, 1)),
            "accuracy": report.accuracy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--formats", default=",".join(ALL_FORMATS))
    ap.add_argument("--n", type=int, default=50, help="held-out examples per task (default 50)")
    ap.add_argument("--ppl-examples", type=int, default=100)
    ap.add_argument("--measure", nargs=4, metavar=("PATH", "DTYPE", "TOKENIZER_DIR", "OUT_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        path, dtype, tok_dir, out = args.measure
        Path(out).write_text(json.dumps(measure(path, dtype, tok_dir, args.n, args.ppl_examples)))
        return
    model = Path(args.model)
    rows = {}
    print(f"# {model.name}: {args.n} held-out examples per task, perplexity over {args.ppl_examples} held-out "
          f"conversations (assistant tokens)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for fmt in args.formats.split(","):
            t = time.perf_counter()
            try:
                path, dtype = prepare(fmt, model, work)
            except subprocess.CalledProcessError as e:
                print(f"# {fmt}: could not prepare ({e})", flush=True)
                continue
            out = work / f"{fmt}.json"
            subprocess.run([sys.executable, __file__, "--measure", path, dtype, str(model), str(out),
                            "--n", str(args.n), "--ppl-examples", str(args.ppl_examples)], check=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
            rows[fmt] = json.loads(out.read_text())
            print(f"# {fmt}: done in {time.perf_counter() - t:.0f} s", flush=True)
    base = rows.get("bf16") or rows.get("fp32")
    base_acc = sum(base["accuracy"].values()) / len(base["accuracy"]) if base else None
    tasks = list(next(iter(rows.values()))["accuracy"]) if rows else []
    print("| format | weight MB | RSS growth at load MB | process RSS MB | perplexity | mean task acc | vs bf16 | "
          + " | ".join(tasks) + " |")
    print("|---" * (7 + len(tasks)) + "|")
    for fmt, r in rows.items():
        acc = sum(r["accuracy"].values()) / len(r["accuracy"])
        rel = f"{100 * acc / base_acc:.1f}%" if base_acc else "-"
        print(f"| {fmt} | {r['weight_bytes'] / 2**20:.1f} | {r['rss_bytes'] / 2**20:.1f} | {r['rss_total_bytes'] / 2**20:.0f} | {r['ppl']:.4f} | "
              f"{100 * acc:.1f}% | {rel} | " + " | ".join(f"{100 * r['accuracy'][t]:.0f}" for t in tasks) + " |")


if __name__ == "__main__":
    main()
