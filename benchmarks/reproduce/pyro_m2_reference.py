"""Pyro's own M2 (``examples/vae/ss_vae_M2.py``), run on the local MNIST files: the reference
for ``kingma2014_m2.py``.

Pyro's tutorial reports 0.932 ± 0.006 test accuracy for M2 with 100 labels (enumerated y, the
auxiliary loss weighted 46, 50 epochs, the test accuracy at the best validation epoch). This
script runs that example's own code (its ``SSVAE`` class and its ``run_inference_for_epoch``
loop, imported from a checkout of Pyro given by ``--pyro-examples``) with its defaults: z of
50 dimensions, one hidden layer of 500 softplus units, Adam 4.2e-4 (β₁ = 0.9), batches of 200,
grey levels in [0, 1] scored as Bernoulli means, 10,000 validation images cut from the end of
the training set, ``sup_num`` labelled images (10 per class for 100) drawn per class. Only the
data loading is written here (the example downloads MNIST through torchvision; this reads the
IDX files of ``--data-dir``), and the two imports that only its plots need (``visdom`` and its
``utils.vae_plots``) are stubbed where they are missing.

After every epoch it prints and records the test and validation accuracy of q(y|x) (argmax),
the mean entropy of q(y|x) on the test images and the accuracy on the labelled images, and it
writes them to ``results/pyro_m2_reference-seed{S}.json``.

    git clone https://github.com/pyro-ppl/pyro   # or any checkout of Pyro 1.9
    python benchmarks/reproduce/pyro_m2_reference.py --pyro-examples pyro/examples/vae \\
        --data-dir ../shared/data --epochs 50 --seed 0
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent


def read_idx(path: Path):
    import numpy as np

    raw = path.read_bytes()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(data_dir: Path):
    import numpy as np
    import torch

    raw = data_dir / "MNIST" / "raw"
    if not raw.is_dir():
        raise SystemExit(f"no MNIST IDX files in {raw}")

    def images(name):
        return torch.tensor(read_idx(raw / name).reshape(-1, 784), dtype=torch.float32) / 255

    def labels(name):
        return torch.tensor(read_idx(raw / name).astype(np.int64))

    return (images("train-images-idx3-ubyte"), labels("train-labels-idx1-ubyte"),
            images("t10k-images-idx3-ubyte"), labels("t10k-labels-idx1-ubyte"))


def import_example(examples: Path):
    """``SSVAE`` and ``run_inference_for_epoch`` from Pyro's example, with its plotting-only
    imports stubbed where they are not installed."""
    if not (examples / "ss_vae_M2.py").is_file():
        raise SystemExit(f"{examples} has no ss_vae_M2.py (give Pyro's examples/vae folder)")
    try:
        import visdom  # noqa: F401
    except ImportError:
        sys.modules["visdom"] = types.SimpleNamespace(Visdom=None)
    sys.path.insert(0, str(examples))
    plots = types.ModuleType("utils.vae_plots")
    plots.mnist_test_tsne_ssvae = plots.plot_conditional_samples_ssvae = None
    sys.modules["utils.vae_plots"] = plots
    import ss_vae_M2

    return ss_vae_M2.SSVAE, ss_vae_M2.run_inference_for_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyro-examples", type=Path, required=True,
                        help="Pyro's examples/vae folder (a checkout of Pyro)")
    parser.add_argument("--data-dir", type=Path, default=HERE.parents[2] / "shared" / "data")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--sup-num", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.sup_num % 10:
        raise SystemExit("--sup-num must be a multiple of 10 (as many labels per class)")

    import numpy as np
    import pyro
    import torch
    from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, config_enumerate
    from pyro.optim import Adam
    from torch.utils.data import DataLoader, TensorDataset

    if args.threads:
        torch.set_num_threads(args.threads)
    SSVAE, run_inference_for_epoch = import_example(args.pyro_examples.resolve())
    x, y, x_test, y_test = load(args.data_dir)
    pyro.set_rng_seed(args.seed)  # seeds numpy too: the labelled images drawn below
    x_valid, y_valid = x[-10000:], y[-10000:]
    x_train, y_train = x[:-10000], y[:-10000]
    labelled = []
    for c in range(10):
        rows = np.nonzero(y_train.numpy() == c)[0]
        np.random.shuffle(rows)
        labelled.extend(rows[:args.sup_num // 10].tolist())
    unlabelled = np.ones(len(y_train), bool)
    unlabelled[labelled] = False

    def one_hot(labels):
        return torch.nn.functional.one_hot(labels, 10).float()

    class Unlabelled:  # the example steps on unlabelled batches with xs alone
        def __init__(self, loader):
            self.loader = loader

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            return ((xs, None) for xs, _ in self.loader)

    loaders = {
        "sup": DataLoader(TensorDataset(x_train[labelled], one_hot(y_train[labelled])),
                          batch_size=200, shuffle=True),
        "unsup": Unlabelled(DataLoader(TensorDataset(x_train[unlabelled], y_train[unlabelled]),
                                       batch_size=200, shuffle=True))}
    model = SSVAE(z_dim=50, hidden_layers=[500], config_enum="parallel",
                  aux_loss_multiplier=46)
    optimizer = Adam({"lr": 0.00042, "betas": (0.9, 0.999)})
    guide = config_enumerate(model.guide, "parallel", expand=True)
    losses = [SVI(model.model, guide, optimizer,
                  loss=TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)),
              SVI(model.model_classify, model.guide_classify, optimizer, loss=Trace_ELBO())]
    interval = int(len(x_train) / args.sup_num)  # the example's periodic_interval_batches

    def scores():
        with torch.no_grad():
            probs = model.encoder_y(x_test)
            return {"test_accuracy": float((probs.argmax(-1) == y_test).float().mean()),
                    "valid_accuracy": float((model.encoder_y(x_valid).argmax(-1) == y_valid)
                                            .float().mean()),
                    "test_entropy": float(-(probs * probs.clamp_min(1e-30).log()).sum(-1)
                                          .mean()),
                    "labelled_accuracy": float((model.encoder_y(x_train[labelled]).argmax(-1)
                                                == y_train[labelled]).float().mean())}

    started, epochs = time.perf_counter(), []
    for epoch in range(1, args.epochs + 1):
        _, unsupervised = run_inference_for_epoch(loaders, losses, interval)
        row = {"epoch": epoch, **scores(),
               "unsupervised_loss": unsupervised[0] / int(unlabelled.sum()),
               "elapsed_s": time.perf_counter() - started}
        epochs.append(row)
        print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in row.items()), flush=True)
    best = max(epochs, key=lambda r: r["valid_accuracy"])
    result = {"what": "Pyro's examples/vae/ss_vae_M2.py (its SSVAE and training loop)",
              "sup_num": args.sup_num, "seed": args.seed, "epochs": epochs,
              "best_valid_epoch": best["epoch"], "test_at_best_valid": best["test_accuracy"],
              "last_test": epochs[-1]["test_accuracy"], "pyro": pyro.__version__,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": f"{platform.processor() or platform.machine()}, "
                         f"Python {platform.python_version()}",
              "command": " ".join([Path(sys.executable).name, *sys.argv])}
    out = args.json or HERE / "results" / f"pyro_m2_reference-seed{args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"best validation accuracy {best['valid_accuracy']:.4f} at epoch {best['epoch']}: "
          f"test accuracy {best['test_accuracy']:.4f}; last {epochs[-1]['test_accuracy']:.4f}")


if __name__ == "__main__":
    main()
