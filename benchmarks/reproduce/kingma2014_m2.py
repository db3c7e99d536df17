"""Kingma, Rezende, Mohamed & Welling (2014), "Semi-supervised Learning with Deep Generative
Models": M2 on MNIST with 100 labels (10 per class).

M2 (``pyro_vae.catalogue.SemiSupervisedVAE``): y observed where labelled, enumerated where not,
with the auxiliary classification loss α·log q(y|x) on the labelled images (α = 50). One hidden
layer of 500 softplus units in the encoder, decoder and classifier, z of 50 dimensions (the
paper's networks), dynamically binarized MNIST, batch 100 drawn stratified: 10 labelled and 90
unlabelled images per step (``labelled_batch``; each part weighted by its own count, an epoch is
a pass over the unlabelled images, so each label is seen about 67 times per epoch), Adam 1e-3.
With uniform minibatches each of the 100 labels is seen once per epoch. The baselines are
trained on the 100 labelled images alone: M2's own classifier network, freshly initialized
(cross-entropy, Adam, full batch), and L2-regularized logistic regression (scikit-learn).

    python benchmarks/reproduce/kingma2014_m2.py
    python benchmarks/reproduce/kingma2014_m2.py --full --device cuda
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PAPER = {"M2 (paper, 100 labels)": 1 - 0.1197, "M2 (Pyro's tutorial)": 0.932}
OPTIONS = {"latent_dim": 50, "hidden": (500,), "classifier_hidden": (500,), "alpha": 50.0,
           "activation": "softplus"}
PER_CLASS = 10
LABELLED_BATCH = 10


def spec(args) -> common.Spec:
    return common.Spec("m2-100-labels", "m2", OPTIONS, "elbo", 1, args.epochs, batch_size=100,
                       lr_schedule="constant", seed=args.seed, labelled_batch=LABELLED_BATCH,
                       data_options=common.data_options(args, labels_per_class=PER_CLASS))


def baselines(args, the_spec: common.Spec) -> dict:
    """Test accuracy of classifiers trained on the labelled images alone."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    dataset = common.load_mnist(args.data_dir, "cpu", the_spec)
    labels = dataset.split_labels("train")
    labelled = labels >= 0
    x, y = dataset.split("train")[labelled], labels[labelled]
    x = torch.bernoulli(x, generator=torch.Generator().manual_seed(args.seed))
    test, test_labels = dataset.split("test"), dataset.split_labels("test")
    torch.manual_seed(args.seed)
    model = common.build(the_spec, dataset)
    classifier = model.classifier
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    for _ in range(2000):  # full batch: the 100 images, well past a perfect training fit
        loss = torch.nn.functional.cross_entropy(classifier(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        network = classifier(test).argmax(-1) == test_labels
    logistic = LogisticRegression(max_iter=10000).fit(x.numpy(), y.numpy())
    regression = torch.as_tensor(logistic.predict(test.numpy())) == test_labels
    return {"labelled": int(labelled.sum()),
            "network_correct": network.numpy().astype(np.int8).tolist(),
            "regression_correct": regression.numpy().astype(np.int8).tolist()}


def main() -> None:
    # the marginal likelihood sums over the 10 classes, and accuracy is the point here: K = 100
    args = common.arguments(__doc__.splitlines()[0], budget=10, full_budget=300, jobs=1,
                            eval_particles=100)
    import numpy as np
    import torch

    started = time.perf_counter()
    the_spec = spec(args)
    rows = common.run_specs([the_spec], args)
    row = rows[the_spec.name]
    base = baselines(args, the_spec)
    # M2's per-image correctness on the test set, from its trained run
    import pyro_vae

    dataset = common.load_mnist(args.data_dir, "cpu", the_spec)
    model = pyro_vae.load_run(row["run_dir"], "cpu", model=common.build(the_spec, dataset)).vae
    with torch.no_grad():
        test, test_labels = dataset.split("test"), dataset.split_labels("test")
        m2 = (model.classify(test).argmax(-1) == test_labels).numpy()
    wall = time.perf_counter() - started
    network = np.asarray(base["network_correct"], bool)
    regression = np.asarray(base["regression_correct"], bool)
    n = len(m2)

    def accuracy(correct):
        p = correct.mean()
        return p, float(np.sqrt(p * (1 - p) / n))

    lines = ["| classifier | labels | test accuracy | reference |", "|---|---:|---:|---:|"]
    for label, correct, ref in [
            ("M2 (this package)", m2, "paper 0.880 (11.97 % error); Pyro's tutorial 0.932"),
            ("M2's classifier network, labels only", network, "—"),
            ("logistic regression, labels only", regression, "—")]:
        p, se = accuracy(correct)
        lines.append(f"| {label} | {base['labelled']} | {p:.4f} ± {se:.4f} | {ref} |")
    claims = []
    for label, baseline in (("its classifier network trained on the labels alone", network),
                            ("logistic regression on the labels alone", regression)):
        gain = m2.astype(float) - baseline.astype(float)
        se = float(gain.std(ddof=1) / np.sqrt(n))
        claims.append(common.claim(
            f"M2 ≫ {label} (at least 5 points and more than 3 paired SE)",
            gain.mean() >= 0.05 and gain.mean() > 3 * se,
            f"{100 * gain.mean():+.1f} ± {100 * se:.1f} points; only M2 right on "
            f"{int((m2 & ~baseline).sum())} images, only the baseline on "
            f"{int((~m2 & baseline).sum())}"))
    row["test_accuracy_full"] = float(m2.mean())
    row["baselines"] = {"network_accuracy": float(network.mean()),
                        "regression_accuracy": float(regression.mean()),
                        "labelled": base["labelled"]}
    path = common.write("kingma2014_m2", args, title="Kingma et al. 2014 (M2), 100 labels",
                        table="\n".join(lines), claims=claims, rows=rows, wall_seconds=wall,
                        notes="The test NLL above is of M2's marginal p(x) = Σ_y p(x, y), "
                              f"K = {args.eval_particles}.")
    print(path.read_text())


if __name__ == "__main__":
    main()
