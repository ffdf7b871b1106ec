"""A PyTorch ResNet as the base network: train it briefly, then
``extract --framework torch`` -> ``fit`` -> ``evaluate``, base vs GradNet.

The ResNet is defined here (torchvision's ``BasicBlock`` design: 3x3
convolutions without bias, BatchNorm, identity or 1x1-projection
shortcuts; no download, no torchvision): a 3x3 stem and three stages of
one block each, widths 8 / 16 / 32, strides 1 / 2 / 2, global average
pooling and a Linear head (19,810 parameters; the 19,464 weights of its
ten Conv2d/Linear layers are the tangent features). It is trained with SGD for
``--base-epochs`` on the base half of the embedded 5,000 MNIST digits
(2,000 base / 2,000 gradnet / 1,000 test, ``gradnet_cupy.data``), its
state dict saved to ``<out>/resnet.pt``; then the ``gradnet-cupy``
commands run on it, as a user would type them (this file is the
``--model`` factory, ``resnet``):

    gradnet-cupy extract --framework torch --model examples/torch_resnet.py:resnet
        --weights <out>/resnet.pt --split gradnet --candidates random --out <out>/train.h5
    gradnet-cupy extract ... --split test --candidates all --out <out>/test.h5
    gradnet-cupy fit --train <out>/train.h5 --test <out>/test.h5 --epochs E --out <out>/gradnet
    gradnet-cupy evaluate --gradnet <out>/gradnet --test <out>/test.h5

Writes ``<out>/result.json`` (base and GradNet test accuracy, timings).

    python examples/torch_resnet.py --out runs/torch-resnet [--base-epochs 1]
        [--gradnet-epochs 10] [--threads 1]
"""
import argparse
import json
import os
import time

import numpy as np
import torch
from torch import nn

HERE = os.path.abspath(__file__)


class BasicBlock(nn.Module):
    """conv3x3 (stride) -> BN -> ReLU -> conv3x3 -> BN, plus the input
    (through a 1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, n_in, n_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(n_in, n_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(n_out)
        self.conv2 = nn.Conv2d(n_out, n_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(n_out)
        self.downsample = None
        if stride != 1 or n_in != n_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(n_in, n_out, 1, stride, bias=False),
                nn.BatchNorm2d(n_out))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(h + shortcut)


class ResNet(nn.Module):
    """Stem conv3x3 8 -> BN -> ReLU -> stages (8, 1), (16, 2), (32, 2) ->
    global average pool -> Linear(n_classes). Input (n, 1, 28, 28)."""

    def __init__(self, in_channels=1, n_classes=10,
                 stages=((8, 1), (16, 2), (32, 2))):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stages[0][0], 3, 1, 1,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(stages[0][0])
        blocks, n_in = [], stages[0][0]
        for n_out, stride in stages:
            blocks.append(BasicBlock(n_in, n_out, stride))
            n_in = n_out
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(n_in, n_classes)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.layers(h)
        return self.fc(h.mean(dim=(2, 3)))


def resnet():
    """The ``--model`` factory: an untrained ResNet in eval mode (the CLI
    loads the trained state dict into it)."""
    return ResNet().eval()


def train(data, epochs, seed, lr=0.05, batch=64):
    """SGD with momentum on the base split; returns the trained model in
    eval mode."""
    torch.manual_seed(seed)
    model = ResNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x, y = data.base
    x, y = torch.from_numpy(data.eval_transform(x)), torch.from_numpy(
        y.astype(np.int64))
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        for idx in np.array_split(rng.permutation(len(x)),
                                  max(1, len(x) // batch)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model.eval()


def accuracy(model, split, transform):
    x, y = split
    with torch.no_grad():
        logits = model(torch.from_numpy(transform(x)))
    return float((logits.argmax(1).numpy() == y).mean())


def cli(*args):
    """Run one gradnet-cupy command in this process; its JSON summary."""
    from gradnet_cupy.cli import main
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main.main([str(a) for a in args] + ['--json'], standalone_mode=False)
    return json.loads(out.getvalue().strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', required=True)
    parser.add_argument('--base-epochs', type=int, default=1)
    parser.add_argument('--gradnet-epochs', type=int, default=10)
    parser.add_argument('--q', type=float, default=85.0)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=None,
                        help='torch threads (default: torch decides)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from gradnet_cupy.data import load_dataset
    data = load_dataset('mnist')
    os.makedirs(args.out, exist_ok=True)
    weights = os.path.join(args.out, 'resnet.pt')
    clock = {}
    start = time.perf_counter()
    model = train(data, args.base_epochs, args.seed)
    clock['train_base_s'] = time.perf_counter() - start
    torch.save(model.state_dict(), weights)
    base = accuracy(model, data.test, data.eval_transform)
    print(f'base ResNet test accuracy {base:.4f}')
    common = ['--framework', 'torch', '--model', f'{HERE}:resnet',
              '--weights', weights, '--q', args.q, '--device', 'cpu',
              '--seed', args.seed]
    stores = {}
    for split, candidates in (('gradnet', 'random'), ('test', 'all')):
        stores[split] = os.path.join(args.out, f'{split}.h5')
        start = time.perf_counter()
        summary = cli('extract', *common, '--split', split, '--candidates',
                      candidates, '--out', stores[split])
        clock[f'extract_{split}_s'] = time.perf_counter() - start
        print(f"{split}: {summary['rows']} rows x {summary['n_columns']} "
              f"columns, density {summary['density']:.4f}")
    folder = os.path.join(args.out, 'gradnet')
    start = time.perf_counter()
    fitted = cli('fit', '--train', stores['gradnet'], '--test',
                 stores['test'], '--epochs', args.gradnet_epochs,
                 '--device', 'cpu', '--seed', args.seed, '--out', folder)
    clock['fit_s'] = time.perf_counter() - start
    evaluated = cli('evaluate', '--gradnet', folder, '--test',
                    stores['test'], '--device', 'cpu')
    result = {'settings': vars(args), 'torch': torch.__version__,
              'torch_threads': torch.get_num_threads(),
              'n_params': sum(p.numel() for p in model.parameters()),
              'base_test_accuracy': base,
              'gradnet_test_accuracy': evaluated['test_accuracy'],
              'fit_test_accuracy': fitted['test_accuracy'],
              'hidden_sizes': fitted['hidden_sizes'], 'seconds': clock}
    with open(os.path.join(args.out, 'result.json'), 'w') as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == '__main__':
    main()
