"""The placement simulator's report: the run results in, JSON + PNG + a summary table out (the JSON is
the record; the plot and the table are views of it), with the issue's targets checked against it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loraplex.tools.report_files import pyplot, write_json_and_png

TARGETS = {"gpu_hit_rate": 0.95, "load_imbalance": 1.25, "home_moves": 0.02}  # the "done when"
DEFINITIONS = {
    "gpu_hit_rate": "requests arriving after warm-up whose adapter was already in the serving shard's GPU tier",
    "load_imbalance": "mean over measured ticks of max/mean outstanding requests (running + waiting) per shard,"
    " sampled at the end of each tick",
    "load_imbalance_p99": "99th percentile over measured ticks of the same max/mean",
    "served_imbalance": "max/mean of requests served per shard over the whole measured window",
    "home_moves": "fraction of all adapters whose ring home changes when churn_fraction of shards are added"
    " (new ids) or removed (chosen at random)",
    "reasons": "bounded_load only: share of all placements (warm-up included) by the reason place() gave",
    "hit_rate_timeline": "GPU hit rate per refresh_ticks window from tick 0 (a tick is 100 ms)",
}


def check_targets(churn_alpha: float, results: dict, moves: dict) -> dict | None:
    """The issue's bar at churn_alpha, for bounded_load, with round-robin's figures beside."""
    at_alpha = results.get(str(float(churn_alpha)), {})
    ours, round_robin = at_alpha.get("bounded_load"), at_alpha.get("round_robin")
    if ours is None:
        return None
    worst_moves = max(moves["ring"].values())
    checks = {
        "gpu_hit_rate": (ours["gpu_hit_rate"], ">=", TARGETS["gpu_hit_rate"]),
        "load_imbalance": (ours["load_imbalance"], "<=", TARGETS["load_imbalance"]),
        "home_moves": (worst_moves, "<=", TARGETS["home_moves"]),
    }
    targets: dict = {"alpha": churn_alpha, "policy": "bounded_load"}
    for name, (value, op, required) in checks.items():
        met = value >= required if op == ">=" else value <= required + 1e-9
        targets[name] = {"value": value, "required": f"{op} {required}", "met": met}
    targets["met"] = all(targets[name]["met"] for name in checks)
    if round_robin is not None:
        targets["round_robin"] = {key: round_robin[key] for key in ("gpu_hit_rate", "load_imbalance")}
    return targets


def write_report(report: dict, output_dir: Path) -> tuple[Path, Path]:
    """placement-sim-<date>.json and .png in output_dir; a rerun the same day replaces them."""
    return write_json_and_png(report, output_dir / f"placement-sim-{report['date']}", plot_report)


def plot_report(report: dict, path: Path) -> None:
    """Hit rate and imbalance per policy and alpha; hit rate over time at the target alpha, with the
    churn run; home moves on churn."""
    plt = pyplot()

    results, config = report["results"], report["config"]
    alphas = list(results)
    policies = [p for p in config["policies"] if all(p in results[a] for a in alphas)]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    width = 0.8 / max(len(policies), 1)
    x = np.arange(len(alphas))
    for metric, axis, title in (
        ("gpu_hit_rate", axes[0, 0], "GPU-tier hit rate"),
        ("load_imbalance", axes[0, 1], "Load imbalance: mean over ticks of max/mean outstanding"),
    ):
        for k, policy in enumerate(policies):
            values = [results[a][policy][metric] for a in alphas]
            bars = axis.bar(x + (k - (len(policies) - 1) / 2) * width, values, width, label=policy)
            axis.bar_label(bars, fmt="%.2f", fontsize=7)
        axis.axhline(TARGETS[metric], color="black", linestyle="--", linewidth=1, label="target")
        axis.set_xticks(x, [f"alpha = {a}" for a in alphas])
        axis.set_title(title)
    axes[0, 0].set_ylim(0, 1.2)
    axes[0, 0].legend(fontsize=8, ncol=3, loc="upper left")
    axes[0, 1].set_yscale("log")
    timeline_axis = axes[1, 0]
    window_s = config["refresh_ticks"] / 10
    target_alpha = str(float(config["churn_alpha"]))
    for policy in policies:
        line = results.get(target_alpha, {}).get(policy, {}).get("hit_rate_timeline", [])
        timeline_axis.plot(np.arange(len(line)) * window_s, line, label=policy)
    churn_run = report["churn"]["run"]
    if churn_run:
        line = churn_run["hit_rate_timeline"]
        timeline_axis.plot(
            np.arange(len(line)) * window_s, line, color="black", linestyle=":", label="churn run"
        )
        for key in ("remove_at_tick", "add_at_tick"):
            timeline_axis.axvline(churn_run["churn"][key] / 10, color="gray", linewidth=0.8)
    timeline_axis.axvline(config["warmup_ticks"] / 10, color="red", linewidth=0.8, label="measuring from")
    timeline_axis.set_xlabel("simulated seconds")
    timeline_axis.set_title(f"GPU hit rate over time, alpha = {target_alpha}")
    timeline_axis.legend(fontsize=8)
    moves = report["churn"]["home_moves"]
    labels = [
        f"{scheme}\n{event} {moves['shards_changed']}"
        for scheme in ("ring", "hash_mod_n")
        for event in moves[scheme]
    ]
    values = [moves[scheme][event] for scheme in ("ring", "hash_mod_n") for event in moves[scheme]]
    bars = axes[1, 1].bar(labels, values, color=["tab:blue", "tab:blue", "tab:gray", "tab:gray"])
    axes[1, 1].bar_label(bars, fmt="%.3f")
    axes[1, 1].axhline(TARGETS["home_moves"], color="black", linestyle="--", linewidth=1)
    axes[1, 1].set_yscale("log")
    axes[1, 1].set_title("Fraction of adapter homes moved on churn")
    fig.suptitle(
        f"Placement simulator: {config['num_shards']} shards x {config['num_adapters']} adapters, "
        f"{config['gpu_slots']} GPU / {config['cpu_slots']} CPU slots, c = {config['capacity_factor']}, "
        f"{report['date']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(report: dict) -> str:
    """The console view: one line per run, then home moves, the churn run, sensitivity and targets."""
    lines = [f"{'alpha':<7}{'policy':<17}{'GPU hit':>9}{'max/mean':>10}{'p99':>8}{'served':>8}{'wall s':>8}"]
    for alpha, policies in report["results"].items():
        for policy, r in policies.items():
            lines.append(
                f"{alpha:<7}{policy:<17}{r['gpu_hit_rate']:>9.4f}{r['load_imbalance']:>10.3f}"
                f"{r['load_imbalance_p99']:>8.3f}{r['served_imbalance']:>8.3f}{r['wall_s']:>8.1f}"
            )
    moves = report["churn"]["home_moves"]
    lines.append(
        f"home moves, {moves['shards_changed']} shards removed / added: ring {moves['ring']['remove']:.4f} / "
        f"{moves['ring']['add']:.4f}, hash mod n {moves['hash_mod_n']['remove']:.4f} / {moves['hash_mod_n']['add']:.4f}"
    )
    churn_run = report["churn"]["run"]
    if churn_run:
        churn = churn_run["churn"]
        lines.append(
            f"churn run hit rate: {churn['hit_rate_before']:.4f} before, lowest "
            f"{churn['lowest_after_remove']:.4f} after removal, {churn['lowest_after_add']:.4f} after adding, "
            f"{churn['hit_rate_last_window']:.4f} at the end"
        )
    for slots, r in report["gpu_slots_sensitivity"]["runs"].items():
        lines.append(
            f"bounded_load with {slots} GPU slots: hit {r['gpu_hit_rate']:.4f}, max/mean {r['load_imbalance']:.3f}"
        )
    targets = report["targets"]
    if targets:
        for name in ("gpu_hit_rate", "load_imbalance", "home_moves"):
            target = targets[name]
            verdict = "met" if target["met"] else "NOT met"
            lines.append(f"target {name} {target['required']}: {verdict} ({target['value']})")
    lines.append(f"wall {report['wall_s']} s on {report['machine']['workers']} workers")
    return "\n".join(lines)
