"""What a hand-made feature and the trivial classifiers score on `stacktrain synth` data (README claims).

    python -m stacktrain.bench.synth_baselines [--stacks 40] [--patient-effect 1] [--difficulty 0.5]

The feature is the one a reviewer would try first: per stack, the 99.5th percentile over tissue voxels
of (ch0 + ch2) / 2 - ch1, the lesion colour. Its stack ROC-AUC says how separable the stacks are without
learning; the all-MALADE classifier's F1 of MALADE is 2p / (1 + p) at prevalence p, its ROC-AUC 0.5.
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score

from stacktrain.stores.synth import plan


def feature(volume: np.ndarray) -> float:
    v = volume.astype(np.float32)
    tissue = (volume > 0).any(axis=0)
    score = (v[0] + v[2]) / 2 - v[1]
    return float(np.percentile(score[tissue], 99.5))


def baselines(stacks: int, shape_zyx, seed: int, **kw) -> dict[str, float]:
    items = plan(stacks, shape_zyx, seed, **kw)
    y = np.array([s.label == "MALADE" for s in items], int)
    x = []
    for s in items:
        x.append(feature(s.volume()))
        s.release()
    p = y.mean()
    return {"stacks": stacks, "prevalence": float(p), "feature_stack_auc": float(roc_auc_score(y, x)),
            "all_malade_f1": float(f1_score(y, np.ones_like(y))), "all_malade_auc": 0.5,
            "all_sain_f1_malade": 0.0}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stacks", type=int, default=40)
    ap.add_argument("--shape", type=int, nargs=3, default=(32, 96, 96))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prevalence", type=float, default=0.5)
    ap.add_argument("--patient-effect", type=float, default=0.0)
    ap.add_argument("--difficulty", type=float, default=0.0)
    a = ap.parse_args(argv)
    print(baselines(a.stacks, tuple(a.shape), a.seed, prevalence=a.prevalence, patient_effect=a.patient_effect,
                    difficulty=a.difficulty))


if __name__ == "__main__":
    main()
