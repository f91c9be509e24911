"""Reference models in plain torch for tests and benchmarks of the runtime: ResNet-18/50 written
out as torchvision defines them (torchvision is not a dependency) and a BERT-style encoder written
by hand (token + position Embedding, LayerNorm, Q/K/V Linear, matmul, transpose/permute,
view/reshape, softmax, GELU, residual adds)."""
from __future__ import annotations

import math


def _nn():
    import torch
    return torch, torch.nn, torch.nn.functional


def resnet18(num_classes: int = 1000):
    """torchvision.models.resnet18 (BasicBlock, [2, 2, 2, 2]), randomly initialized."""
    return _resnet("basic", [2, 2, 2, 2], num_classes)


def resnet50(num_classes: int = 1000):
    """torchvision.models.resnet50 (Bottleneck, [3, 4, 6, 3], stride on the 3x3 conv), randomly initialized."""
    return _resnet("bottleneck", [3, 4, 6, 3], num_classes)


def _resnet(kind, layers, num_classes):
    torch, nn, F = _nn()

    def conv3x3(i, o, stride=1):
        return nn.Conv2d(i, o, 3, stride=stride, padding=1, bias=False)

    def conv1x1(i, o, stride=1):
        return nn.Conv2d(i, o, 1, stride=stride, bias=False)

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1, self.bn1 = conv3x3(inplanes, planes, stride), nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
            self.downsample = downsample

        def forward(self, x):
            identity = x
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            if self.downsample is not None:
                identity = self.downsample(x)
            out += identity
            return self.relu(out)

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1, self.bn1 = conv1x1(inplanes, planes), nn.BatchNorm2d(planes)
            self.conv2, self.bn2 = conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)
            self.conv3, self.bn3 = conv1x1(planes, planes * 4), nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x):
            identity = x
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            if self.downsample is not None:
                identity = self.downsample(x)
            out += identity
            return self.relu(out)

    block = BasicBlock if kind == "basic" else Bottleneck

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.inplanes = 64
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            self.layer1 = self._make_layer(64, layers[0])
            self.layer2 = self._make_layer(128, layers[1], 2)
            self.layer3 = self._make_layer(256, layers[2], 2)
            self.layer4 = self._make_layer(512, layers[3], 2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512 * block.expansion, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)

        def _make_layer(self, planes, blocks, stride=1):
            downsample = None
            if stride != 1 or self.inplanes != planes * block.expansion:
                downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                           nn.BatchNorm2d(planes * block.expansion))
            out = [block(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes * block.expansion
            out += [block(self.inplanes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*out)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return ResNet()


def bert_encoder(vocab: int = 30522, hidden: int = 768, layers: int = 12, heads: int = 12, ffn: int = 3072,
                 max_len: int = 512):
    """A BERT-style encoder written by hand: forward(input_ids [B, S] int64, attention_mask [B, S]
    1 = token, 0 = padding) -> hidden states [B, S, hidden]."""
    torch, nn, F = _nn()

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
            self.o = nn.Linear(hidden, hidden)
            self.ln1, self.ln2 = nn.LayerNorm(hidden, eps=1e-12), nn.LayerNorm(hidden, eps=1e-12)
            self.f1, self.f2 = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)

        def forward(self, x, ext):
            b, s, _ = x.shape
            hd = hidden // heads
            q = self.q(x).view(b, s, heads, hd).transpose(1, 2)
            k = self.k(x).view(b, s, heads, hd).permute(0, 2, 1, 3)
            v = self.v(x).view(b, s, heads, hd).transpose(1, 2)
            p = F.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(hd) + ext, dim=-1)
            a = torch.matmul(p, v).transpose(1, 2).reshape(b, s, hidden)
            x = self.ln1(x + self.o(a))
            return self.ln2(x + self.f2(F.gelu(self.f1(x))))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab, hidden), nn.Embedding(max_len, hidden)
            self.ln = nn.LayerNorm(hidden, eps=1e-12)
            self.layers = nn.ModuleList(Layer() for _ in range(layers))

        def forward(self, input_ids, attention_mask):
            pos = torch.arange(input_ids.size(1))
            x = self.ln(self.tok(input_ids) + self.pos(pos))
            ext = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
            for layer in self.layers:
                x = layer(x, ext)
            return x

    return Encoder()
