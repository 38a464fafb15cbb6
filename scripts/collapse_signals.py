"""Does a cheap signal separate a momentum-ascent run that collapses from one that learns? Reads the cached rho sweeps
(seed 0) of the momentum rows of the robustness study (`benchmarks/accuracy/runs`) and prints, per run, its test
accuracy and the candidates a trainer could watch: ||e|| / ||w_S|| at the start (rho over the norm of the perturbed
weights at initialisation), the logged loss of the first epoch (the loss at w + e) and its rise over the first three
epochs. A run collapsed when its final test accuracy is below half of AdamW's.

    python scripts/collapse_signals.py            # markdown table on stdout
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_lwsam import select_layers  # noqa: E402
from hf_lwsam.selection import layer_parameters  # noqa: E402
from study_tasks import tiny_vit  # noqa: E402

RUNS = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy" / "runs"
ROWS = {"full momentum": "all", "LW-SAM momentum": "pattern"}


def weight_norm(selection: str, seed: int = 0) -> float:
    """||w_S|| of the digits ViT at initialisation for the selection."""
    model = tiny_vit(seed)
    if selection == "all":
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = [p for _, p in layer_parameters(model, select_layers(model))]
    return float(torch.sqrt(sum((p.detach() ** 2).sum() for p in params)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["digits-noise40", "digits-noise20"])
    a = p.parse_args()
    norms = {row: weight_norm(selection) for row, selection in ROWS.items()}
    print("| task | row | rho | test acc. | collapsed | rho / ‖w_S‖ | loss, epoch 1 | loss rise, epochs 1-3 |")
    print("|---|---|---|---|---|---|---|---|")
    for task in a.tasks:
        adamw = json.loads((RUNS / f"{task}__adamw__rho0.0__seed0__lr0.001.json").read_text())["test"]["accuracy"]
        for row in ROWS:
            name = row.replace(" ", "_")
            for path in sorted(RUNS.glob(f"{task}__{name}__rho*__seed0.json"), key=lambda f: json.loads(
                    f.read_text())["rho"]):
                r = json.loads(path.read_text())
                curve, acc = r["train_loss_curve"], r["test"]["accuracy"]
                print(f"| {task} | {row} | {r['rho']} | {acc:.3f} | {'yes' if acc < adamw / 2 else 'no'} | "
                      f"{r['rho'] / norms[row]:.4f} | {curve[0]:.2f} | {max(curve[:3]) - curve[0]:+.2f} |")


if __name__ == "__main__":
    main()
