"""Re-measure the toy world's targets on 500 held-out problems of the default level.

    python bench/toy.py            # print the table
    python bench/toy.py --write    # also refresh data/toy/measured.json (quoted by data/toy/CARD.md)

Targets (issue: toy world): small greedy accuracy in [30%, 75%]; large >= 85% and >= 20 points
above small; large >= 4x the parameters of small; the small model's mean raw max-logit over a
step separates valid from invalid steps with AUROC >= 0.65. Toy-medium (issue: K models): between
the two in parameters and in greedy accuracy, at least 5 points from each, step AUROC >= 0.65.
Sampled accuracy at T=0.7 is reported.

Repair (issue: a large model that repairs): from every prefix with exactly one wrong toy-small step,
the last (toy-small's T=0.7 drafts of the same held-out problems, each cut right after its first invalid
step when a step can still follow it), the share that the model's completion gets right (greedy and
T=0.7): toy-large >= 70%; and after every proper prefix of the reference solutions, the share where the
model's next step is a needless repair: toy-large <= 2%.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from data.toy import LANGUAGE_MODELS, MODEL_ALIASES, TOY_DIR  # noqa: E402
from data.toy.task import DEFAULT_LEVEL, generate  # noqa: E402
from scripts.toy.evaluate import evaluate, heldout_repair_prefixes, needless_repairs, repair_rate  # noqa: E402


def load(name: str):
    path = MODEL_ALIASES[name]
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def measure(name: str, n: int, prefixes) -> dict:
    tokenizer, model = load(name)
    started = time.time()
    result = {
        "n_params": sum(p.numel() for p in model.parameters()),
        "greedy": evaluate(model, tokenizer, n=n, level=DEFAULT_LEVEL),
        "sampled_t0.7": evaluate(model, tokenizer, n=n, level=DEFAULT_LEVEL, temperature=0.7, seed=1),
        "repair_greedy": repair_rate(model, tokenizer, prefixes),
        "repair_t0.7": repair_rate(model, tokenizer, prefixes, temperature=0.7, seed=2),
        "needless_repairs": needless_repairs(model, tokenizer, generate(n, split="test", level=DEFAULT_LEVEL)),
    }
    result["seconds"] = round(time.time() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokenizer, small_model = load("toy-small")
    prefixes = heldout_repair_prefixes(small_model, tokenizer, n=args.n)
    measured = {name: measure(name, args.n, prefixes) for name in LANGUAGE_MODELS}
    small, large = measured["toy-small"], measured["toy-large"]
    checks = {
        "small greedy accuracy in [0.30, 0.75]": 0.30 <= small["greedy"]["accuracy"] <= 0.75,
        "large greedy accuracy >= 0.85": large["greedy"]["accuracy"] >= 0.85,
        "large - small >= 0.20": large["greedy"]["accuracy"] - small["greedy"]["accuracy"] >= 0.20,
        "large params >= 4x small": large["n_params"] >= 4 * small["n_params"],
        "large params < 1M": large["n_params"] < 1_000_000,
        "small step AUROC >= 0.65": small["greedy"]["step_auroc"] >= 0.65,
        "large repair rate (greedy) >= 0.70": large["repair_greedy"]["repair_rate"] >= 0.70,
        "large needless repairs <= 0.02": large["needless_repairs"]["share"] <= 0.02,
    }
    if "toy-medium" in measured:
        medium = measured["toy-medium"]
        accuracy = {name: m["greedy"]["accuracy"] for name, m in measured.items()}
        checks |= {
            "medium params strictly between small and large": small["n_params"]
            < medium["n_params"]
            < large["n_params"],
            "medium greedy accuracy >= small + 0.05": accuracy["toy-medium"] >= accuracy["toy-small"] + 0.05,
            "medium greedy accuracy <= large - 0.05": accuracy["toy-medium"] <= accuracy["toy-large"] - 0.05,
            "medium step AUROC >= 0.65": medium["greedy"]["step_auroc"] >= 0.65,
        }
    print(f"{'model':<10} {'params':>9} {'greedy acc':>10} {'T=0.7 acc':>10} {'step valid':>10} {'step AUROC':>10}")
    for name, m in measured.items():
        g, s = m["greedy"], m["sampled_t0.7"]
        print(
            f"{name:<10} {m['n_params']:>9,} {g['accuracy']:>10.1%} {s['accuracy']:>10.1%} "
            f"{g['step_validity']:>10.1%} {g['step_auroc']:>10.3f}"
        )
    print(f"held-out problems: {args.n} of level {DEFAULT_LEVEL}")
    print(f"repair: {len(prefixes)} prefixes with one wrong toy-small step, the last (of {args.n} T=0.7 drafts)")
    for name, m in measured.items():
        g, s = m["repair_greedy"], m["repair_t0.7"]
        print(
            f"{name} repair rate {g['repair_rate']:.1%} greedy (next step a repair {g['next_step_is_repair']:.1%}), "
            f"{s['repair_rate']:.1%} at T=0.7; needless repairs {m['needless_repairs']['share']:.1%} "
            f"of {m['needless_repairs']['n_prefixes']} right prefixes"
        )
    for name, m in measured.items():
        for setting in ("greedy", "sampled_t0.7"):
            r = m[setting]
            depth = ", ".join(f"{d}: {a:.3f}" for d, a in r["step_auroc_by_depth"].items())
            print(
                f"{name} {setting}: step AUROC of mean max-logit {r['step_auroc']:.3f} (by depth {depth}); "
                f"of min max-logit {r['step_auroc_min_logit']:.3f}"
            )
    for claim, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {claim}")
    if args.write:
        (TOY_DIR / "measured.json").write_text(json.dumps(measured, indent=1) + "\n")
        print(f"wrote {TOY_DIR / 'measured.json'}")


if __name__ == "__main__":
    main()
