"""A sweep's report, computed from its records alone: summary.json, summary.md, accuracy_by_turn.png
(accuracy with 95% Wilson intervals, paired comparisons of methods, the Words fallback and Weights
safeguard counts, what the adaptation did, and the later Weights steps by failed-answer length) and, when a
method took Weights steps, step_norm_by_turn.png (mean ||Δθ||² by turn, the study's view of the paper's
Figure 3 / Theorem 4.1)."""

from __future__ import annotations

import json
from pathlib import Path

from rosa2_jax.study.metrics import compare_methods, summarize


def table(summary: dict) -> str:
    lines = ["| method | problems | accuracy [95% CI] | turn-1 acc | correction uplift (caption / App. C) | avg turns | "
             "Words fallback | Weights steps kept / refused | s/problem |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        lo, hi = s["accuracy_ci95"]
        words = f"{100 * s['words_fallback_rate']:.0f}% of {s['words_steps']}" if s["words_steps"] else "-"
        weights = (f"{s['weights_steps'] - s['weights_steps_rejected']} / {s['weights_steps_rejected']}"
                   if s["weights_steps"] else "-")
        lines.append(f"| {m} | {s['problems']} | {100 * s['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | "
                     f"{100 * s['turn1_accuracy']:.1f} | {100 * s['correction_uplift']:.1f} / "
                     f"{100 * s['correction_uplift_appc']:.1f} | {s['avg_turns']:.2f} | {words} | {weights} | "
                     f"{s['seconds_per_problem']:.1f} |")
    return "\n".join(lines)


def comparison_table(comparisons: list[dict]) -> str:
    lines = ["| a vs b | problems | acc a | acc b | a - b [95% paired bootstrap] | only a / only b | McNemar p "
             "| same first answer |", "|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        lo, hi = c["ci95"]
        lines.append(f"| {c['a']} vs {c['b']} | {c['problems']} | {100 * c['accuracy_a']:.1f} | "
                     f"{100 * c['accuracy_b']:.1f} | {100 * c['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] | "
                     f"{c['only_a']} / {c['only_b']} | {c['mcnemar_p']:.3g} | {c['same_first_answer']} |")
    return "\n".join(lines)


def behaviour_table(summary: dict) -> str:
    """What the adaptation did (metrics._behaviour); "-" where a method has nothing to count."""
    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%"

    def num(x):
        return "-" if x is None else f"{x:.3g}"

    lines = ["| method | later turns keeping the answer | repeating the response word for word | later turns "
             "without an answer | answer tokens (turn 1 / later) | failed answer's log-prob drop per step | "
             "mean ‖Δθ‖² (all steps / kept steps) |",
             "|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        drop = "-" if s["failed_logp_drop"] is None else f"{s['failed_logp_drop']:+.3f}"
        norm = f"{num(s['mean_step_norm_sq'])} / {num(s['mean_applied_step_norm_sq'])}"
        tokens = f"{num(s['mean_response_tokens_first'])} / {num(s['mean_response_tokens_later'])}"
        lines.append(f"| {m} | {pct(s['answer_kept_rate'])} | {pct(s['response_repeated_rate'])} | "
                     f"{pct(s['later_unanswered_rate'])} | {tokens} | {drop} | {norm} |")
    return "\n".join(lines)


def words_table(summary: dict) -> str:
    """The Words messages of each method that sent any (adapt/quality.py)."""
    rows = {m: s["words_quality"] for m, s in summary.items() if s.get("words_quality")}
    if not rows:
        return ""

    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%"

    lines = ["| method | Words steps | instructive | verdict kept | bare | new numbers | failed answer stated | leaks | "
             "paths | most common opening | distinct openings | tokens per answer token |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, q in rows.items():
        paths = ", ".join(f"{k} {pct(v)}" for k, v in q["status"].items() if v)
        ratio = "-" if q["tokens_per_answer_token"] is None else f"{q['tokens_per_answer_token']:.2f}"
        lines.append(f"| {m} | {q['steps']} | {pct(q['instructive'])} | {pct(q['verdict_kept'])} | {pct(q['bare'])} | "
                     f"{pct(q['new_numbers'])} | {pct(q['states_failed'])} | {pct(q['leaks'])} | {paths} | "
                     f"{q['top_opening']!r} ({pct(q['top_opening_share'])}) | {pct(q['distinct_openings'])} | {ratio} |")
    return "\n".join(lines)


def step_length_table(summary: dict) -> str:
    """Mean ‖Δθ‖² of the kept Weights steps after turn 1, by the failed answer's length (the step's window),
    with the number kept and refused."""
    weights = {m: s["later_applied_step_norm_sq_by_answer_tokens"] for m, s in summary.items() if s["weights_steps"]}
    if not weights:
        return ""
    lengths = list(next(iter(weights.values())))
    lines = ["| kept ‖Δθ‖² after turns 2+ (steps kept, refused) | "
             + " | ".join(f"answers of {k} tokens" for k in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for m, split in weights.items():
        cells = [("-" if c["mean"] is None else f"{c['mean']:.3g}") + f" ({c['steps']}, {c['refused']})"
                 for c in split.values()]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(6.5, 4.2))


def _save(plt, fig, ax, path: Path, turns: list[int]) -> None:
    ax.set_xlabel("turn")
    ax.set_xticks(turns)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(summary: dict, path: Path, max_turns: int) -> None:
    plt, fig, ax = _figure()
    turns = list(range(1, max_turns + 1))
    for m, s in summary.items():
        line, = ax.plot(turns, [100 * a for a in s["accuracy_by_turn"]], marker="o", label=f"{m} (n={s['problems']})")
        lo, hi = zip(*s["accuracy_by_turn_ci95"])
        ax.fill_between(turns, [100 * x for x in lo], [100 * x for x in hi], color=line.get_color(), alpha=0.12)
    ax.set_ylabel("accuracy within turn (%), 95% Wilson band")
    _save(plt, fig, ax, path, turns)


def plot_step_norms(summary: dict, path: Path, max_turns: int) -> None:
    """Mean ||Δθ||² of the Weights steps taken after each turn's failed answer: solid over every step (a
    refused step counts as 0), dashed over the steps the KL safeguard kept."""
    plt, fig, ax = _figure()
    turns = list(range(1, max_turns + 1))
    nan = float("nan")
    for m, s in summary.items():
        if not s["weights_steps"]:
            continue
        every = [nan if x is None else x for x in s["mean_step_norm_sq_by_turn"]]
        kept = [nan if x is None else x for x in s["mean_applied_step_norm_sq_by_turn"]]
        line, = ax.plot(turns, every, marker="o", label=f"{m}, all {s['weights_steps']} steps")
        ax.plot(turns, kept, marker="x", linestyle="--", color=line.get_color(),
                label=f"{m}, {s['weights_steps'] - s['weights_steps_rejected']} kept")
    ax.set_ylabel("mean ||Δθ||² of the Weights step after turn t")
    _save(plt, fig, ax, path, turns)


def write_report(run_dir: Path, records: list[dict], max_turns: int, run: dict,
                 questions: dict[str, str] | None = None) -> tuple[dict, str]:
    """Write summary.json / summary.md / accuracy_by_turn.png (and step_norm_by_turn.png when a method took
    Weights steps); return (per-method summary, markdown). `questions` (problem id -> text) lets the Words
    table count numbers that are not in the problem."""
    summary = summarize(records, max_turns, questions)
    comparisons = compare_methods(records)
    (run_dir / "summary.json").write_text(json.dumps({"methods": summary, "comparisons": comparisons, "run": run},
                                                     indent=2))
    md = "\n\n".join(part for part in (table(summary), comparison_table(comparisons), behaviour_table(summary),
                                         words_table(summary), step_length_table(summary)) if part)
    (run_dir / "summary.md").write_text(md + "\n")
    plot(summary, run_dir / "accuracy_by_turn.png", max_turns)
    if any(s["weights_steps"] for s in summary.values()):
        plot_step_norms(summary, run_dir / "step_norm_by_turn.png", max_turns)
    return summary, md
