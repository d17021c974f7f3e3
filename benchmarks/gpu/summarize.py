"""Gather what ``benchmarks/gpu/check.sh`` wrote into OUT_DIR/results.json and a Markdown table
(OUT_DIR/results.md, docs/PERFORMANCE.md); exit 1 if a part or a test failed.
Run: ``python benchmarks/gpu/summarize.py OUT_DIR``."""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_counts(path: Path) -> dict | None:
    """tests / failures / errors / skipped from pytest's JUnit XML."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    return counts | {"time_s": float(suite.get("time", 0.0))}


def markdown(results: dict) -> str:
    env, lines = results.get("env") or {}, []
    gpu = env.get("gpu") or "CPU (dry run)"
    lines.append(f"GPU check on **{gpu}** (torch {env.get('torch')}, transformers {env.get('transformers')}, "
                 f"trl {env.get('trl')}), {results['seconds']} s in all.")
    tests = results.get("cuda_tests")
    if tests:
        lines.append(f"\n`cuda` tests: {tests['tests'] - tests['failures'] - tests['errors'] - tests['skipped']} "
                     f"passed, {tests['failures']} failed, {tests['errors']} errors, {tests['skipped']} skipped.")
    sft = results.get("sft")
    if sft:
        memory = "peak GPU MiB" if sft.get("memory") == "peak_gpu_mib" else "peak RSS MiB"
        lines += ["", (f"SFT, {sft.get('model', '').split('/')[-1]} ({sft['n_params'] / 1e6:.0f}M parameters, random "
                       f"init), {sft.get('precision')}, packed {sft.get('max_length')}-token micro-batches; matmul "
                       f"rate {sft['matmul_flops'] / 1e12:.1f} TFLOP/s measured in the run:"), "",
                  f"| system | tokens/s | trained tokens/s | MFU | {memory} |", "| --- | ---: | ---: | ---: | ---: |"]
        for name, row in sft["systems"].items():
            mfu = 6 * sft["n_params"] * row["tokens_per_s"] / sft["matmul_flops"]
            lines.append(f"| {name} | {row['tokens_per_s']:,.0f} | {row['trained_tokens_per_s']:,.0f} | {mfu:.1%} | "
                         f"{row[sft['memory']]:,.0f} |")
        if "speed_ratio" in sft:
            lines.append(f"\nposttrain / {sft['best_trl']}: {sft['speed_ratio']:.2f}x trained tokens/s (target >= 1.5), "
                         f"memory {sft['memory_ratio']:.2f}x (target <= 1.0); posttrain MFU {sft['posttrain_mfu']:.1%} "
                         f"(target >= 45%).")
    grpo = results.get("grpo")
    if grpo and "posttrain" in grpo:
        split = grpo["posttrain"]["split"]
        lines += ["", (f"GRPO, {grpo['prompts']} prompts x {grpo['group_size']} completions, "
                       f"{grpo['max_new_tokens']} new tokens, HF engine, {grpo['precision']}:"), "",
                  "| system | step s | generate s | logprob s | update s |", "| --- | ---: | ---: | ---: | ---: |",
                  (f"| posttrain | {grpo['posttrain']['mean_step_s']:.2f} | {split['time/generate']:.2f} | "
                   f"{split['time/logprob']:.2f} | {split['time/update']:.2f} |")]
        if "trl" in grpo:
            lines.append(f"| TRL GRPOTrainer | {grpo['trl']['mean_step_s']:.2f} | | | |")
            lines.append(f"\nposttrain / TRL step time: {grpo['step_time_ratio']:.2f} (target <= 0.5).")
    attention = results.get("attention")
    if attention:
        lines += ["", "Attention forward+backward (one layer's shape):", "", "| layout | backend | tokens | ms |",
                  "| --- | --- | ---: | ---: |"]
        for name, case in attention["cases"].items():
            layout, backend = name.rsplit("/", 1)
            lines.append(f"| {layout} | {backend} | {case['tokens']} | {case['ms']:.2f} |")
        lines.append(f"\nflex / varlen: {attention['packed/flex_speedup']:.2f}x packed, "
                     f"{attention['shared_prompt/flex_speedup']:.2f}x shared prompt; shared prompt vs plain packing of "
                     f"the same groups: {attention['shared_prompt_vs_plain_speedup']:.2f}x.")
    failed = [p["part"] for p in results["parts"] if p.get("rc") not in (0,)]
    lines.append("\nParts: " + ", ".join(f"{p['part']} rc={p.get('rc')} ({p['seconds']} s)" for p in results["parts"])
                 + (f". FAILED: {', '.join(failed)}" if failed else "."))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--dry-run", default="0")
    parser.add_argument("--seconds", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    parts = [json.loads(line) for line in (out / "parts.jsonl").read_text().splitlines() if line.strip()]
    results = {"dry_run": args.dry_run == "1", "seconds": args.seconds, "parts": parts, "env": _load(out / "env.json"),
               "cuda_tests": test_counts(out / "cuda_tests.xml"), "attention": _load(out / "attention.json"),
               "sft": _load(out / "sft.json"), "grpo": _load(out / "grpo.json")}
    if results["env"]:
        results["env"].pop("nvidia_smi", None)
    try:
        table = markdown(results)
    except (KeyError, TypeError, ZeroDivisionError) as exc:  # a part failed half-way: keep the raw figures
        table = f"(no table: {type(exc).__name__}: {exc})\n"
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table)
    tests = results["cuda_tests"] or {}
    ok = all(p.get("rc") == 0 for p in parts) and not tests.get("failures") and not tests.get("errors")
    print(f"GPU check {'passed' if ok else 'FAILED'}: {out / 'results.json'}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
