"""Small PyTorch definitions of the reference generators, and the fixtures made with them.

The reference is junyanz/pytorch-CycleGAN-and-pix2pix (`networks.UnetGenerator`,
`networks.ResnetGenerator`); these classes are written from its published architecture (same
`nn.Sequential` nesting and indices, hence the same state-dict keys), not copied from it.
`tests/test_torch_io.py` imports them for its torch parity tests.

Regenerate the fixtures (needs torch and safetensors; deterministic for a given torch version):

    python tests/data/make_reference_generators.py

writes, next to this file, for each of `unet64_batch_1ch` (pix2pix: U-Net of 6 levels, ngf 2, at
64 px, batch norm, dropout, 1 channel) and `resnet2_instance_3ch` (CycleGAN: 2 blocks, instance
norm, ngf 4, 3 channels, 32 px):
  <name>.safetensors  the state dict, exactly as `netG.state_dict()` holds it
  <name>_io.npz       `x` a fixed NCHW input in [-1, 1] and `y` the torch output in eval mode
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
from torch import nn

HERE = pathlib.Path(__file__).resolve().parent


def norm_layer(kind: str, channels: int) -> nn.Module:
  if kind == "batch":
    return nn.BatchNorm2d(channels)
  return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class UnetBlock(nn.Module):
  """One level: down conv, the inner levels, up conv; output = cat(input, result) but for the
  outermost level."""

  def __init__(self, outer: int, inner: int, input_nc: int | None = None,
               sub: nn.Module | None = None, *, outermost: bool = False,
               innermost: bool = False, norm: str = "batch", use_dropout: bool = False):
    super().__init__()
    self.outermost = outermost
    bias = norm == "instance"
    input_nc = outer if input_nc is None else input_nc
    down = nn.Conv2d(input_nc, inner, 4, 2, 1, bias=bias)
    if outermost:
      layers = [down, sub, nn.ReLU(True), nn.ConvTranspose2d(2 * inner, outer, 4, 2, 1),
                nn.Tanh()]
    elif innermost:
      layers = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True),
                nn.ConvTranspose2d(inner, outer, 4, 2, 1, bias=bias), norm_layer(norm, outer)]
    else:
      layers = [nn.LeakyReLU(0.2, True), down, norm_layer(norm, inner), sub, nn.ReLU(True),
                nn.ConvTranspose2d(2 * inner, outer, 4, 2, 1, bias=bias),
                norm_layer(norm, outer)]
      if use_dropout:
        layers.append(nn.Dropout(0.5))
    self.model = nn.Sequential(*layers)

  def forward(self, x):
    return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
  def __init__(self, input_nc: int, output_nc: int, num_downs: int, ngf: int = 64,
               norm: str = "batch", use_dropout: bool = False):
    super().__init__()
    block = UnetBlock(ngf * 8, ngf * 8, innermost=True, norm=norm)
    for _ in range(num_downs - 5):
      block = UnetBlock(ngf * 8, ngf * 8, sub=block, norm=norm, use_dropout=use_dropout)
    for m in (4, 2, 1):
      block = UnetBlock(ngf * m, ngf * m * 2, sub=block, norm=norm)
    self.model = UnetBlock(output_nc, ngf, input_nc, block, outermost=True, norm=norm)

  def forward(self, x):
    return self.model(x)


class ResnetBlock(nn.Module):
  def __init__(self, dim: int, norm: str, use_dropout: bool):
    super().__init__()
    bias = norm == "instance"
    layers = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), norm_layer(norm, dim),
              nn.ReLU(True)]
    if use_dropout:
      layers.append(nn.Dropout(0.5))
    layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), norm_layer(norm, dim)]
    self.conv_block = nn.Sequential(*layers)

  def forward(self, x):
    return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
  def __init__(self, input_nc: int, output_nc: int, ngf: int = 64, norm: str = "instance",
               use_dropout: bool = False, n_blocks: int = 9):
    super().__init__()
    bias = norm == "instance"
    layers = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, 7, bias=bias),
              norm_layer(norm, ngf), nn.ReLU(True)]
    for i in range(2):
      c = ngf * 2**i
      layers += [nn.Conv2d(c, 2 * c, 3, 2, 1, bias=bias), norm_layer(norm, 2 * c),
                 nn.ReLU(True)]
    layers += [ResnetBlock(ngf * 4, norm, use_dropout) for _ in range(n_blocks)]
    for i in range(2):
      c = ngf * 2**(2 - i)
      layers += [nn.ConvTranspose2d(c, c // 2, 3, 2, 1, output_padding=1, bias=bias),
                 norm_layer(norm, c // 2), nn.ReLU(True)]
    layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]
    self.model = nn.Sequential(*layers)

  def forward(self, x):
    return self.model(x)


def randomize(net: nn.Module, seed: int) -> nn.Module:
  """Random weights everywhere, batch-norm statistics included, so eval mode tests them."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in net.state_dict().items():
      if name.endswith("num_batches_tracked"):
        continue
      if name.endswith("running_var"):
        t.copy_(0.5 + torch.rand(t.shape, generator=g))
      elif name.endswith("running_mean"):
        t.copy_(0.1 * torch.randn(t.shape, generator=g))
      elif t.ndim == 1 and name.endswith("weight"):
        t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
      else:
        t.copy_(0.1 * torch.randn(t.shape, generator=g))
  return net.eval()


def forward(net: nn.Module, x: np.ndarray) -> np.ndarray:
  """NCHW numpy in, NCHW numpy out, eval mode."""
  with torch.no_grad():
    return net.eval()(torch.from_numpy(x)).numpy()


FIXTURES = {
    "unet64_batch_1ch": (lambda: UnetGenerator(1, 1, 6, ngf=2, norm="batch", use_dropout=True),
                         (2, 1, 64, 64)),
    "resnet2_instance_3ch": (lambda: ResnetGenerator(3, 3, ngf=4, norm="instance",
                                                     n_blocks=2), (2, 3, 32, 32)),
}


def main() -> None:
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  for i, (name, (build, shape)) in enumerate(FIXTURES.items()):
    net = randomize(build(), seed=i)
    x = np.random.default_rng(i).uniform(-1, 1, shape).astype(np.float32)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(HERE / f"{name}.safetensors"))
    np.savez_compressed(HERE / f"{name}_io.npz", x=x, y=forward(net, x))
    print(f"wrote {name}: {sum(v.numel() for v in net.state_dict().values())} values")


if __name__ == "__main__":
  main()
