"""Markdown tables from the JSON that ``benchmarks/attention.py`` writes.

Usage: python benchmarks/report_attention.py benchmarks/results/attention-....json
"""

from __future__ import annotations

import json
import sys


def attention_table(rows: list[dict], backend: str) -> str:
    head = ("| shape | batch x context | s | dense SDPA (graph) | ours (graph) | speed-up | ours eager / dense eager "
            "| bytes read | achieved | ours / floor |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['batch']} x {r['context'] // 1024}k | {r['sparsity']} | {r['dense_graph_us']:.1f} us "
            f"| {r[f'{backend}_graph_us']:.1f} us | {r[f'{backend}_graph_speedup']:.2f}x "
            f"| {r[f'{backend}_us']:.1f} / {r['dense_us']:.1f} us | {r['bytes'] / 1e6:.1f} MB "
            f"| {r[f'{backend}_bw_tbs']:.2f} TB/s | {r[f'{backend}_over_floor']:.2f} |"
        )
    return "\n".join(lines)


def compress_table(rows: list[dict], backends: list[str]) -> str:
    lines = ["| shape | rows | s | " + " | ".join(f"{b}: time, read BW fraction, exact" for b in backends) + " |",
             "|" + "---|" * (3 + len(backends))]
    for r in rows:
        cells = [f"{r[f'{b}_us']:.1f} us, {100 * r[f'{b}_read_fraction']:.0f} %, {r[f'{b}_exact']}" for b in backends]
        lines.append(f"| {r['shape']} | {r['batch']} x 8 x {r['tokens']} | {r['sparsity']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    data = json.load(open(sys.argv[1]))
    env = data["environment"]
    backends = [k[:-3] for k in data["attention"][0] if k.endswith("_us") and not k.startswith(("dense", "floor"))
                and "graph" not in k]
    print(f"Device {env['device']} ({env['sms']} SMs), torch {env['torch']}, Triton {env['triton']}, CUDA "
          f"{env['cuda']}, {env['date']}; copy {env['copy_bw_tbs']:.2f} TB/s, read {env['read_bw_tbs']:.2f} TB/s.\n")
    for backend in backends:
        print(f"### backend `{backend}`\n")
        print(attention_table(data["attention"], backend) + "\n")
    print("### prune + compress\n")
    print(compress_table(data["compress"], backends))


if __name__ == "__main__":
    main()
