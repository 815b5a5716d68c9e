"""MMER added to a plain Avalanche workflow: Naive on Split Fashion-MNIST, with and without MMERPlugin.

    python examples/avalanche_plugin.py                      # task-incremental, MTSimpleMLP
    python examples/avalanche_plugin.py --class-incremental  # one 10-way head, no task labels at test
    python examples/avalanche_plugin.py --class-incremental --router entropy  # the baseline router

Fashion-MNIST is read offline (Debian's dataset-fashion-mnist, unpacked once for torchvision). Prints
Avalanche's own final accuracy and forgetting for Naive and for Naive + MMERPlugin, and, without task labels,
how often the router sent a test sample to its own experience's weights.
"""

import argparse
import tempfile

import torch
from avalanche.benchmarks.classic import SplitFMNIST
from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
from avalanche.models import MTSimpleMLP, SimpleMLP
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin

from mmer_cl import MMERPlugin
from mmer_cl.data import fashion_mnist_root
from mmer_cl.routing import GaussianRouter, entropy_router


def run(benchmark, model, plugins, epochs: int, seed: int) -> dict:
    torch.manual_seed(seed)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                                 forgetting_metrics(experience=True, stream=True),
                                 bwt_metrics(experience=True, stream=True), loggers=[])
    strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=128, train_epochs=epochs, eval_mb_size=512,
                     plugins=plugins, evaluator=evaluator)
    for experience in benchmark.train_stream:
        strategy.train(experience)
        results = strategy.eval(benchmark.test_stream)
    return results


def main(argv=None, benchmark=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--class-incremental", action="store_true")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--router", choices=["gaussian", "entropy"], default="gaussian",
                        help="without task labels: class-conditional Gaussians in theta0's features, or lowest entropy")
    args = parser.parse_args(argv)
    task_labels = not args.class_incremental
    benchmark = benchmark or SplitFMNIST(n_experiences=5, return_task_id=task_labels, seed=args.seed,
                                              dataset_root=fashion_mnist_root())

    def new_model():
        torch.manual_seed(args.seed)
        return MTSimpleMLP(hidden_size=256) if task_labels else SimpleMLP(num_classes=10, hidden_size=256)

    out = {}
    with tempfile.TemporaryDirectory() as folder:
        router = GaussianRouter() if args.router == "gaussian" else entropy_router
        plugin = MMERPlugin(f"{folder}/state", router=router)
        for name, plugins in (("naive", []), ("naive + MMERPlugin", [plugin])):
            results = run(benchmark, new_model(), plugins, args.epochs, args.seed)
            stream_accuracy = next(k for k in results if k.startswith("Top1_Acc_Stream/eval_phase/test_stream"))
            out[name] = {"accuracy": results[stream_accuracy],
                         "forgetting": results["StreamForgetting/eval_phase/test_stream"],
                         "bwt": results["StreamBWT/eval_phase/test_stream"]}
            print(f"{name:<20} accuracy {out[name]['accuracy']:.3f}  forgetting {out[name]['forgetting']:.3f}  "
                  f"BWT {out[name]['bwt']:.3f}")
        if plugin.routing:
            final = plugin.routing[-len(benchmark.test_stream):]  # the evaluation after the last experience
            right, total = sum(e["chosen"][e["experience"]] for e in final), sum(sum(e["chosen"]) for e in final)
            out["routing_accuracy"] = right / total
            print(f"routing ({args.router}): {out['routing_accuracy']:.3f} of the test samples on their own weights")
    return out


if __name__ == "__main__":
    main()
