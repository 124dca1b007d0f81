"""The Markdown report of ``end_to_end.py``'s results (``end_to_end.json``)."""
from __future__ import annotations

from ceilings import env_line
from decode_step import target_text


def sampling_text(sampling: dict | None) -> str:
    """How every request of both systems sampled (runs that predate the option were greedy)."""
    if not sampling or not sampling["temperature"]:
        return "greedy"
    return ", ".join(f"{k} {v}" for k, v in sampling.items())


def markdown(r: dict) -> str:
    res, c = r["results"], r["correctness"]

    def tok(system: str, w: str) -> str:
        x = res.get(system, {}).get(w)
        return "-" if x is None else ("error" if "error" in x else f"{x['tok_s']:.0f}")

    lines = [
        "# End to end: kvscope vs vLLM and HF transformers, output tokens/s", "", env_line(r["environment"]), "",
        f"{r['model']} (random weights, one copy shared by both systems), {r['dtype']}; kvscope `paged`, CUDA graphs "
        f"on, engine {r['engine']}, sampling {sampling_text(r.get('sampling'))}, async scheduling {r.get('async_scheduling', 'off (predates it)')}. Copy {r['copy_ceiling']['gb_per_s']:.0f} GB/s and bf16 matmul "
        f"{r['matmul']['tflop_per_s']:.0f} TFLOP/s measured in this run give the roofline (idealised schedule: "
        "prefill at the matmul rate, each decode step reading weights + running KV at the copy rate). Output "
        f"tokens / wall time; median of {r['repeats']} runs (HF continuous batching: {r['cb_repeats']}) after a "
        "warm-up. HF CB = `continuous_batching_context_manager` (the manager of `generate_batch`), warm-up excluded; "
        "`generate_batch` = one call, its warm-up included.", "",
        f"vLLM: {r.get('vllm') or 'not run'}.", "",
        "| workload | requests | prompt tok | output tok | roofline tok/s | kvscope tok/s | kvscope % roofline | "
        "vLLM tok/s | vLLM % roofline | kvscope / vLLM | HF CB tok/s | kvscope / HF CB | HF static tok/s | "
        "HF dynamic tok/s | HF generate_batch tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, w in r["workloads"].items():
        if "roofline" not in w:
            lines.append(f"| {name} | not run: {w.get('error', 'not asked for')} |" + " |" * 13)
            continue
        k, v, cb = (res.get(x, {}).get(name, {}) for x in ("kvscope", "vllm", "hf_cb"))
        roof = w["roofline"]["tok_s"]
        frac = lambda x: f"{x['tok_s'] / roof:.0%}" if "tok_s" in x else "-"  # noqa: E731
        ratio = lambda a, b: f"{a['tok_s'] / b['tok_s']:.2f}x" if "tok_s" in a and "tok_s" in b else "-"  # noqa: E731
        lines.append(f"| {name} | {w['requests']} | {w['prompt_tokens']} | {w['output_tokens']} | {roof:.0f} | "
                     f"{tok('kvscope', name)} | {frac(k)} | {tok('vllm', name)} | {frac(v)} | {ratio(k, v)} | "
                     f"{tok('hf_cb', name)} | {ratio(k, cb)} | {tok('hf_static', name)} | {tok('hf_dynamic', name)} | "
                     f"{tok('hf_generate_batch', name)} |")
    extra = [x for x in res if x.startswith("kvscope:")]
    if extra:
        lines += ["", "Other kvscope strategies, same engine and pool (tok/s, and against vLLM):", "",
                  "| workload | " + " | ".join(f"`{x[8:]}`" for x in extra) + " |", "|---|" + "---:|" * len(extra)]
        for name in r["workloads"]:
            v = res.get("vllm", {}).get(name, {})
            cells = [f"{tok(x, name)} ({ratio(res[x].get(name, {}), v)})" for x in extra]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    errors = [f"{s} {w}: {x['error']}" for s, d in res.items() for w, x in d.items() if "error" in x]
    lines += ["", "## Against the targets (W1; recorded, not asserted)", ""]
    k, cb, w1 = res["kvscope"].get("W1", {}), res["hf_cb"].get("W1", {}), r["workloads"]["W1"]
    if "tok_s" in k and "roofline" in w1:
        lines.append(f"- kvscope >= 50% of the roofline: {target_text(k['tok_s'] / w1['roofline']['tok_s'], 0.5)}.")
    if "tok_s" in k and "tok_s" in cb:
        lines.append(f"- kvscope >= 8x HF continuous batching: {target_text(k['tok_s'] / cb['tok_s'], 8, 'x')}.")
    lines += ["", f"Correctness (before timing, {c.get('model', r['model'])} in {c.get('dtype', r['dtype'])}): first-step "
              f"logits of kvscope vs HF forward on a {c['prompt_len']}-token "
              f"prompt: relative L2 error {c['first_rel_l2']:.2e}, max |diff| {c['first_max_abs_diff']:.3g} (largest "
              f"|logit| {c['first_max_abs_logit']:.3g}); greedy tokens agree for {c['agree']} of {c['steps']} steps"
              + (f" (divergence at a near-tie: top-2 gap {c['gap_at_divergence']:.3g})" if c["agree"] < c["steps"] else "")
              + f". Passed: {c['passed']}."]
    lines += [f"- Error: {e}" for e in errors]
    return "\n".join(lines) + "\n"
