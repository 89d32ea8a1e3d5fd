"""The tests' PyTorch twin of EarlyExit's multi-exit ResNet, written from its definition (not generated from it), with
the network's own state-dict names, so that weights cross between the two:

    segments.{k}.layers.stem.{conv,bn}                      the CIFAR stem (3x3 conv, BN, ReLU), in segment 1
    segments.{k}.layers.block{n}.{conv1,bn1,conv2,bn2}      BasicBlock n (1-based over the whole network)
    segments.{k}.layers.block{n}.{shortcutConv,shortcutBn}  its projection shortcut, where the shape changes
    heads.{k}.{alpha,linear}                                SDN head: alpha*maxpool4 + (1-alpha)*avgpool4, flatten, linear
    heads.{last}.linear                                     the final head: global average pool, flatten, linear

    python3 multiexit_resnet.py check  WEIGHTS SIDECAR.json IMAGES.npy LOGITS.npy
        load exported weights (.pt through torch.load, .safetensors through the reader below) into the twin built
        from the sidecar's recipe, run the images, print {"maxAbsDiff": [...per exit]} against LOGITS (exits x N x C)
    python3 multiexit_resnet.py make   WEIGHTS SIDECAR.json IMAGES.npy LOGITS_OUT.npy SEED
        a twin with random weights and random BatchNorm statistics, saved as WEIGHTS (.pt or .safetensors), and its
        logits on the images
Debian 12's python3-torch (1.13) has no safetensors module: the format (an 8-byte little-endian header length, a
JSON index, the raw bytes) is read and written here.
"""
import json
import struct
import sys
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Stem(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.projection = stride != 1 or cin != cout
        if self.projection:
            self.shortcutConv = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            self.shortcutBn = nn.BatchNorm2d(cout)

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        s = self.shortcutBn(self.shortcutConv(x)) if self.projection else x
        return F.relu(y + s)


class Segment(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.Sequential(OrderedDict(layers))

    def forward(self, x):
        return self.layers(x)


class SdnHead(nn.Module):
    def __init__(self, channels, classes, pool=4):
        super().__init__()
        self.alpha = nn.Parameter(torch.rand(1))
        self.pool = pool
        self.linear = nn.Linear(channels * pool * pool, classes)
        # Pool in channels-last layout, as EarlyExit's head does (the same values, faster on CPU), and in training take
        # the features in H,W,C order with the linear's weight columns reordered to match, as EarlyExit's head does
        # (flatten(1)'s backward would hand the pools an NCHW gradient for a channels-last input, a slow path): the
        # benchmark's peer turns it on for its timings; functorch's vmap refuses that layout.
        self.channels_last = False

    def forward(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        pooled = self.alpha * F.adaptive_max_pool2d(x, self.pool) + (1 - self.alpha) * F.adaptive_avg_pool2d(x, self.pool)
        if self.channels_last and torch.is_grad_enabled():
            n, c, h, w = pooled.shape
            weight = self.linear.weight.view(-1, c, h, w).permute(0, 2, 3, 1).reshape(-1, h * w * c)
            return F.linear(pooled.permute(0, 2, 3, 1).reshape(n, h * w * c), weight, self.linear.bias)
        return self.linear(pooled.flatten(1))


class PoolLinearHead(nn.Module):
    def __init__(self, channels, classes):
        super().__init__()
        self.linear = nn.Linear(channels, classes)

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


class MultiExitResNet(nn.Module):
    def __init__(self, blocks, width, exits, classes, channels):
        super().__init__()
        widths = [width << i for i in range(len(blocks))]
        plan = [(s, b) for s in range(len(blocks)) for b in range(blocks[s])]
        self.segments, self.heads = nn.ModuleList(), nn.ModuleList()
        c, start = widths[0], 0
        for e, end in enumerate(exits):
            layers = []
            if e == 0:
                layers.append(("stem", Stem(channels, widths[0])))
            for blk in range(start, end):
                s, b = plan[blk]
                stride = 2 if s > 0 and b == 0 else 1
                layers.append((f"block{blk + 1}", BasicBlock(c, widths[s], stride)))
                c = widths[s]
            start = end
            self.segments.append(Segment(layers))
            last = e == len(exits) - 1
            self.heads.append(PoolLinearHead(c, classes) if last else SdnHead(c, classes))

    def forward(self, x):
        out = []
        for seg, head in zip(self.segments, self.heads):
            x = seg(x)
            out.append(head(x))
        return out


def from_sidecar(sidecar):
    m = sidecar["recipe"]["model"]
    channels = sidecar["input"][0]
    return MultiExitResNet(tuple(m["blocks"]), m["width"], tuple(m["exits"]), sidecar["classes"], channels)


DTYPES = {"F32": (torch.float32, 4), "F64": (torch.float64, 8), "I64": (torch.int64, 8), "I32": (torch.int32, 4)}
NAMES = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.int32: "I32"}


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    index = json.loads(raw[8:8 + n].decode("utf-8"))
    data = raw[8 + n:]
    out = {}
    for name, e in index.items():
        if name == "__metadata__":
            continue
        dtype, size = DTYPES[e["dtype"]]
        a, b = e["data_offsets"]
        t = torch.frombuffer(bytearray(data[a:b]), dtype=dtype) if b > a else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(e["shape"]).clone()
    return out


def write_safetensors(path, state):
    index, chunks, offset = {}, [], 0
    for name, t in state.items():
        t = t.detach().contiguous()
        b = t.numpy().tobytes()
        index[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        chunks.append(b)
        offset += len(b)
    header = json.dumps(index).encode("utf-8")
    header += b" " * ((8 - len(header) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for b in chunks:
            f.write(b)


def load(path):
    return read_safetensors(path) if path.endswith(".safetensors") else torch.load(path)


def logits_of(net, images):
    net.eval()
    with torch.no_grad():
        return torch.stack(net(torch.from_numpy(images))).numpy()


def main(argv):
    mode, weights, sidecar_path, images_path, logits_path = argv[1:6]
    torch.set_num_threads(1)
    with open(sidecar_path) as f:
        sidecar = json.load(f)
    images = np.load(images_path).astype(np.float32)
    net = from_sidecar(sidecar)
    if mode == "check":
        net.load_state_dict(load(weights), strict=True)
        ours = np.load(logits_path)
        theirs = logits_of(net, images)
        diff = np.abs(ours - theirs).reshape(ours.shape[0], -1).max(axis=1)
        print(json.dumps({"maxAbsDiff": [float(d) for d in diff], "shape": list(theirs.shape)}))
    elif mode == "make":
        torch.manual_seed(int(argv[6]))
        net = from_sidecar(sidecar)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
                m.num_batches_tracked.fill_(7)
        state = net.state_dict()
        if weights.endswith(".safetensors"):
            write_safetensors(weights, state)
        else:
            torch.save(state, weights)
        np.save(logits_path, logits_of(net, images))
        print(json.dumps({"tensors": len(state)}))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv)
