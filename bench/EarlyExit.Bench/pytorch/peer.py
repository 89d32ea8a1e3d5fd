"""The benchmark's PyTorch peer: the same multi-exit ResNet as EarlyExit's cpu scale (width 8, blocks [2,2,2,2],
exits after blocks 1, 2, 4, 6, 8, SDN heads, 1x28x28 input, 10 classes), timed the way EarlyExit's benchmark times
its own: a training step (joint loss = mean of the exits' cross-entropies, AdamW), inference latency (every exit, eval
mode, no gradients), and the per-sample empirical Fisher of the last exit over N samples (functorch vmap of grad,
chunked; PyTorch 1.13's fastest way). The bench runs this script once per measurement, alternating with its own, and
reads one JSON line from standard output.

    python3 peer.py describe
    python3 peer.py train   --threads T --batch B --steps S --warmup W
    python3 peer.py latency --threads T --batch B --iterations I --warmup W
    python3 peer.py fisher  --threads T --samples N --chunk C
    python3 peer.py profile --threads T --iterations I
        what batch-1 inference spends its time on: the whole forward, each convolution alone at its own input (summed),
        and one trivial op (ReLU of one element: the framework's cost per op), each the median of I timings
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F


# The network is the tests' PyTorch twin of EarlyExit's ResNet (tests/Interop/multiexit_resnet.py, copied beside this
# script by the bench's build): the one whose logits the weight-exchange tests check against ours.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from multiexit_resnet import MultiExitResNet, SdnHead  # noqa: E402


def model():
    torch.manual_seed(0)
    net = MultiExitResNet(blocks=(2, 2, 2, 2), width=8, exits=(1, 2, 4, 6, 8), classes=10, channels=1)
    for h in net.heads:
        if isinstance(h, SdnHead):
            h.channels_last = True
    return net


def versions():
    blas = "unknown"
    try:
        import os
        blas = os.path.realpath("/etc/alternatives/libblas.so.3-x86_64-linux-gnu")
    except Exception:
        pass
    mkldnn = torch.backends.mkldnn.is_available()
    onednn = "unknown"
    for line in torch.__config__.show().splitlines():
        if "MKL-DNN" in line or "oneDNN" in line:
            onednn = line.split(")", 1)[-1].strip().split(" (")[0]
    return {"torch": torch.__version__, "onednn_available": mkldnn, "onednn": onednn, "blas": blas,
            "threads": torch.get_num_threads()}


def train(a):
    net = model().train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(a.batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (a.batch,), generator=g)
    times, forward, backward, optimizer = [], [], [], []
    for step in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        logits = net(x)
        loss = sum(F.cross_entropy(l, y) for l in logits) / len(logits)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        loss.item()  # the trainer reads the loss back every step too
        t3 = time.perf_counter()
        if step >= a.warmup:
            times.append(t3 - t0)
            forward.append(t1 - t0)
            backward.append(t2 - t1)
            optimizer.append(t3 - t2)
    # The phases' medians (ms): forward with the loss; zero_grad and backward; AdamW's step and the loss read back.
    med = lambda v: 1000 * sorted(v)[len(v) // 2]
    return {"secondsPerStep": sum(times) / len(times), "imagesPerSecond": a.batch * len(times) / sum(times),
            "forwardMs": med(forward), "backwardMs": med(backward), "optimizerMs": med(optimizer)}


def latency(a):
    net = model().eval()
    x = torch.randn(a.batch, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for _ in range(a.warmup):
            net(x)
        t0 = time.perf_counter()
        for _ in range(a.iterations):
            out = net(x)
            out[-1].sum().item()
        t = time.perf_counter() - t0
    return {"msPerBatch": 1000 * t / a.iterations, "msPerSample": 1000 * t / a.iterations / a.batch}


def fisher(a):
    from functorch import make_functional_with_buffers, vmap, grad

    net = model().eval()
    for h in net.heads:
        if isinstance(h, SdnHead):
            h.channels_last = False
    # The last exit's log-likelihood with respect to the backbone's parameters (segments 1..M), as EarlyExit computes F(M).
    fmodel, params, buffers = make_functional_with_buffers(net)
    names = [n for n, _ in net.named_parameters()]
    keep = [i for i, n in enumerate(names) if n.startswith("segments.")]

    def loglik(p, b, x, y):
        logits = fmodel(p, b, x.unsqueeze(0))[-1]
        return F.log_softmax(logits, 1).gather(1, y.view(1, 1)).sum()

    per_sample = vmap(grad(loglik), in_dims=(None, None, 0, 0))
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(a.samples, 1, 28, 28, generator=g)
    ys = torch.randint(0, 10, (a.samples,), generator=g)
    sums = [torch.zeros_like(params[i]) for i in keep]
    t0 = time.perf_counter()
    for s in range(0, a.samples, a.chunk):
        grads = per_sample(params, buffers, xs[s:s + a.chunk], ys[s:s + a.chunk])
        for k, i in enumerate(keep):
            sums[k].add_((grads[i] ** 2).sum(0))
    fisher = [t / a.samples for t in sums]
    t = time.perf_counter() - t0
    return {"seconds": t, "samples": a.samples, "parameters": int(sum(f.numel() for f in fisher))}


def median_us(f, iterations, warmup=20):
    for _ in range(warmup):
        f()
    ts = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return 1e6 * ts[len(ts) // 2]


def profile(a):
    net = model().eval()
    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    inputs = []
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks = [c.register_forward_hook(lambda m, i, o: inputs.append((m, i[0].clone()))) for c in convs]
    with torch.no_grad():
        net(x)
        for h in hooks:
            h.remove()

        def forward():
            out = net(x)
            out[-1].sum().item()

        total = median_us(forward, a.iterations)
        conv = sum(median_us(lambda m=m, i=i: m(i), a.iterations) for m, i in inputs)
        one = torch.randn(1)
        op = median_us(lambda: F.relu(one), a.iterations)
    return {"forwardUs": total, "convolutionsUs": conv, "convolutions": len(inputs), "opUs": op}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["describe", "train", "latency", "fisher", "profile"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=128)
    a = p.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if a.mode == "describe":
        net = model()
        result = {"parameters": sum(t.numel() for t in net.parameters()),
                  "backboneParameters": sum(t.numel() for n, t in net.named_parameters() if n.startswith("segments."))}
    else:
        result = {"train": train, "latency": latency, "fisher": fisher, "profile": profile}[a.mode](a)
    result.update(versions())
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
