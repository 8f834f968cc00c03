"""Model registry. The CLI and configs name models; weights come only from local files.

A model name is one of:
- a registered name (``conv3`` .. ``conv6``, ``resnet18_modified``);
- any torchvision classifier (``resnet18``, ``mobilenet_v2``, ...), random init, nothing downloaded;
- an import path ``package.module:ClassName`` to your own ``nn.Module`` classifier. It is constructed as
  ``ClassName(**kwargs)`` (``--arch-kwargs`` / ``--student-kwargs``, a JSON object), with
  ``num_classes=<the dataset's class count>`` added when the constructor has a parameter named
  ``num_classes`` (and kwargs do not already set it). Channels and image size are not passed: set them in
  the kwargs if your class needs them. The module must be importable (installed, or on ``PYTHONPATH``).

Every built model is checked by one forward pass of a zero image ``[1, channels, size, size]``: it must
return logits ``[1, num_classes]``, or building fails with an error that names the model.

Parameter names follow RDED / SRe2L, so their checkpoints (``{"model": state_dict}``) load unchanged:
RDED's ConvNet keeps ``layers.conv.N``, ``layers.norm.N`` and ``classifier``; ResNets are torchvision's.
"""
from __future__ import annotations

import warnings

import importlib
import inspect
import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torchvision

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(fn):
        MODELS[name] = fn
        return fn

    return deco


class ConvNet(nn.Module):
    """RDED's ConvNet: ``depth`` x (conv3x3 width 128, BatchNorm, ReLU, 2x2 avg-pool), then a linear layer
    on the flattened map. A 28 px one-channel input is padded by 3 in the first conv (28 -> 32 px), as in
    RDED/DC, so its feature map is the same as for 32 px inputs."""

    def __init__(self, num_classes: int, depth: int = 3, width: int = 128, channels: int = 3,
                 im_size: int = 32, norm: str = "batch"):
        super().__init__()
        self.depth = depth
        conv, nrm, act, pool = [], [], [], []
        cin = channels
        for d in range(depth):
            conv.append(nn.Conv2d(cin, width, kernel_size=3, padding=3 if channels == 1 and d == 0 else 1))
            if norm == "batch":
                nrm.append(nn.BatchNorm2d(width))
            elif norm == "instance":
                nrm.append(nn.GroupNorm(width, width))
            act.append(nn.ReLU())
            pool.append(nn.AvgPool2d(2, 2))
            cin = width
        self.layers = nn.ModuleDict({"conv": nn.ModuleList(conv), "norm": nn.ModuleList(nrm),
                                     "act": nn.ModuleList(act), "pool": nn.ModuleList(pool)})
        # the padding-3 first conv grows one-channel inputs by 4 px (28 -> 32), so measure the map
        size = im_size + (4 if channels == 1 else 0)
        for _ in range(depth):
            size //= 2
        self.feature_shape = (width, size, size)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, [B, width, h, w]."""
        for d in range(self.depth):
            x = self.layers["conv"][d](x)
            if len(self.layers["norm"]):
                x = self.layers["norm"][d](x)
            x = self.layers["act"][d](x)
            x = self.layers["pool"][d](x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


for _d in (3, 4, 5, 6):
    register(f"conv{_d}")(
        lambda num_classes, channels=3, input_size=32, _d=_d: ConvNet(num_classes, _d, 128, channels, input_size))


def _first_conv_channels(model: nn.Module, channels: int) -> nn.Module:
    if channels != 3 and hasattr(model, "conv1"):
        c = model.conv1
        model.conv1 = nn.Conv2d(channels, c.out_channels, c.kernel_size, c.stride, c.padding, bias=c.bias is not None)
    return model


@register("resnet18_modified")
def resnet18_modified(num_classes: int, channels: int = 3, input_size: int = 32) -> nn.Module:
    """ResNet-18 for small images (RDED/SRe2L): 3x3 stride-1 stem, no max-pool."""
    m = torchvision.models.resnet18(num_classes=num_classes)
    m.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    return m


def parse_model_kwargs(kwargs: str | dict | None, flag: str = "--arch-kwargs") -> dict:
    """Constructor keyword arguments from a JSON object string (the config's form) or a dict."""
    if kwargs is None or kwargs == "":
        return {}
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as e:
            raise ValueError(f"{flag} {kwargs!r} is not valid JSON ({e}); expected an object, "
                             "e.g. '{\"width\": 64}'") from e
    if not isinstance(kwargs, dict):
        raise ValueError(f"{flag} must be a JSON object (keyword arguments), not {type(kwargs).__name__}: {kwargs!r}")
    return dict(kwargs)


def is_import_path(name: str) -> bool:
    return ":" in name


def _import_attr(path: str):
    """The object named by ``package.module:Name`` (``Name`` may be dotted: ``Outer.Inner``)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model {path!r}: an import path is written package.module:ClassName")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ValueError(f"model {path!r}: module {module_name!r} is not importable (no module named "
                             f"{e.name!r}); install it or put its folder on PYTHONPATH "
                             "(e.g. `PYTHONPATH=. nrrdd ...`)") from e
        raise ValueError(f"model {path!r}: importing module {module_name!r} failed: {e}") from e
    except Exception as e:  # noqa: BLE001 - any error while importing user code names the module
        raise ValueError(f"model {path!r}: importing module {module_name!r} failed: {type(e).__name__}: {e}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            found = sorted(n for n, v in vars(module).items()
                           if isinstance(v, type) and issubclass(v, nn.Module) and v.__module__ == module.__name__)
            raise ValueError(f"model {path!r}: module {module_name!r} has no {attr!r}; nn.Module classes "
                             f"defined there: {found}")
        obj = getattr(obj, part)
    return obj


def _build_imported(path: str, num_classes: int, kwargs: dict) -> nn.Module:
    cls = _import_attr(path)
    if not callable(cls):
        raise ValueError(f"model {path!r} is a {type(cls).__name__}, not a class")
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    if "num_classes" in params and "num_classes" not in kwargs:
        kwargs = {**kwargs, "num_classes": num_classes}
    try:
        model = cls(**kwargs)
    except Exception as e:  # noqa: BLE001 - a failing constructor names the class and its arguments
        raise ValueError(f"model {path!r}: {_call_text(path, kwargs)} failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {path!r}: {_call_text(path, kwargs)} returned a {type(model).__name__}, "
                         "not an nn.Module")
    return model


def _call_text(path: str, kwargs: dict) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"{path.partition(':')[2]}({args})"


def build_model(name: str, num_classes: int, channels: int = 3, input_size: int = 224,
                kwargs: str | dict | None = None) -> nn.Module:
    """Build a registered model, any torchvision classifier by its name (random init, no download), or a
    class given as ``package.module:ClassName``, and check its output size with one zero image.

    ``kwargs``: constructor keyword arguments (dict or JSON object string), for import paths and
    torchvision models; registered models take none.
    """
    kw = parse_model_kwargs(kwargs, f"constructor kwargs of model {name!r} (--arch-kwargs / --student-kwargs)")
    builders = torchvision.models.list_models(module=torchvision.models)
    if is_import_path(name):
        model = _build_imported(name, num_classes, kw)
    elif name in MODELS:
        if kw:
            raise ValueError(f"registered model {name!r} takes no constructor kwargs (got {kw})")
        model = MODELS[name](num_classes, channels=channels, input_size=input_size)
    elif name in builders:
        try:
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kw)
        except TypeError as e:
            raise ValueError(f"torchvision model {name!r} does not accept kwargs {kw}: {e}") from e
        model = _first_conv_channels(model, channels)
    else:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(MODELS)}; or any torchvision classifier "
                         f"(e.g. resnet18, resnet50, mobilenet_v2); or your own class as package.module:ClassName")
    check_outputs(model, name, num_classes, channels, input_size)
    return model


def check_outputs(model: nn.Module, name: str, num_classes: int, channels: int, input_size: int) -> None:
    """Raise ValueError unless ``model`` maps one zero image [1, channels, size, size] to [1, num_classes]."""
    try:
        out = _dry_forward(model, channels, input_size)
    except Exception as e:  # noqa: BLE001 - a failing forward names the model and the input it got
        raise ValueError(f"model {name!r} fails on one zero image of shape [1, {channels}, {input_size}, "
                         f"{input_size}] (the dataset's channels and size): {type(e).__name__}: {e}") from e
    k = _logit_count(out, name)
    if k != num_classes:
        raise ValueError(f"model {name!r} outputs {k} values per image but the dataset has {num_classes} "
                         "classes (a classifier must return logits [batch, num_classes])")


def extract_state_dict(obj) -> dict[str, torch.Tensor]:
    """Accept a plain state_dict, RDED/SRe2L's ``{"model": ...}`` or ``{"state_dict": ...}``, with or without
    a ``module.`` prefix (DataParallel / DDP)."""
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("checkpoint holds no state_dict (expected a state_dict or {'model': state_dict})")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _dry_forward(model: nn.Module, channels: int, input_size: int):
    was = model.training
    model.eval()
    p = next(model.parameters(), None)
    device, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    try:
        with torch.no_grad():
            return model(torch.zeros(1, channels, input_size, input_size, device=device, dtype=dtype))
    finally:
        model.train(was)


def _logit_count(out, name: str) -> int:
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"model {name!r} returns a {type(out).__name__}; nrrdd needs a tensor of logits "
                         "[batch, num_classes]")
    if out.ndim != 2 or out.shape[0] != 1:
        raise ValueError(f"model {name!r} returns shape {list(out.shape)} for one image; nrrdd needs logits "
                         "[batch, num_classes]")
    return out.shape[1]


def num_outputs(model: nn.Module, channels: int, input_size: int) -> int:
    """The number of logits ``model`` returns for one zero image (a dry forward in eval mode)."""
    return _logit_count(_dry_forward(model, channels, input_size), type(model).__name__)


def load_model(name: str, path: str | Path, num_classes: int, channels: int, input_size: int,
               kwargs: str | dict | None = None) -> nn.Module:
    """Build ``name`` (with constructor ``kwargs``) and load weights from a local checkpoint (a state_dict
    or ``{"model": state_dict}``), checking its class count."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"teacher checkpoint {path} does not exist (train one with `nrrdd train-teacher`)")
    sd = read_state_dict(path)
    model = build_model(name, num_classes, channels, input_size, kwargs)
    head = [k for k, v in sd.items() if v.ndim == 2]
    if head:
        out = sd[head[-1]].shape[0]
        if out != num_classes:
            raise ValueError(f"teacher {path} has {out} output classes but the dataset has {num_classes}")
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        what = _mismatch(model.state_dict(), sd)
        # RDED's ConvNet: the classifier's width depends on the input size
        fits = fitting_sizes(name, num_classes, channels, kwargs, sd) if name in MODELS else []
        hint = f"; its classifier fits --input-size {' or '.join(map(str, fits))}" if fits else ""
        raise ValueError(f"checkpoint {path} does not fit model {name!r} ({channels} channels, {input_size} px, "
                         f"{num_classes} classes): {what}{hint}") from e
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's state_dict, read with ``weights_only=True``; a file that is not a readable PyTorch
    checkpoint (text, random bytes, a truncated file, a pickle that would run code, no tensors) is a
    ValueError naming the file and what is wrong, in one line."""
    import pickle
    import zipfile

    path = Path(path)
    try:
        with warnings.catch_warnings():     # (the unpickler's notes on a file it then refuses; the error says it)
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"teacher checkpoint {path} cannot be read: {_refused_pickle(path)}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, KeyError, ValueError, IndexError, OSError) as e:
        text = " ".join(str(e).split())[:160]
        if isinstance(e, EOFError) or "failed finding central directory" in text or "truncated" in text.lower():
            why = f"the file is truncated or damaged ({text or type(e).__name__})"
        else:
            why = f"not a PyTorch checkpoint ({type(e).__name__}: {text})"
        raise ValueError(f"teacher checkpoint {path} cannot be read: {why}") from None
    try:
        return extract_state_dict(obj)
    except ValueError as e:
        raise ValueError(f"teacher checkpoint {path}: {e}") from None


def _refused_pickle(path: Path) -> str:
    """Why ``weights_only`` loading refused ``path``: not a pickle at all, or a pickle that names Python objects
    (functions, classes) other than tensors, which unpickling would call."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                blob = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        else:
            blob = path.read_bytes()
        names, strings = [], []
        for op, arg, _ in pickletools.genops(blob):
            if op.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:           # not a pickle (or a damaged one): what torch.load would read is not there
        return "not a PyTorch checkpoint (neither a zip archive nor a pickle)"
    foreign = [n for n in names if not n.startswith(("torch.", "collections.", "_codecs.", "builtins.set"))]
    what = f" ({', '.join(dict.fromkeys(foreign))})" if foreign else ""
    return f"it holds Python objects other than tensors{what}, which loading would have to run as code " \
           "(refused: weights_only=True)"


def _mismatch(want: dict, got: dict) -> str:
    """What differs between a model's state_dict (``want``) and a checkpoint's (``got``), in a few words."""
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    shapes = [f"{k} is {tuple(got[k].shape)}, the model's {tuple(v.shape)}" for k, v in want.items()
              if k in got and tuple(got[k].shape) != tuple(v.shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s) (first: {unexpected[0]})")
    if shapes:
        parts.append(f"{len(shapes)} tensor(s) of another shape (first: {shapes[0]})")
    return "; ".join(parts) or "the tensors differ"


SIZES = (28, 32, 64, 96, 112, 128, 160, 192, 224, 256, 299)


def fitting_sizes(name: str, num_classes: int, channels: int, kwargs, sd: dict) -> list[int]:
    """The common input sizes (:data:`SIZES`) at which model ``name`` has exactly the tensor shapes of ``sd`` (for
    RDED's ConvNet the classifier's width depends on the input size)."""
    fits = []
    for size in SIZES:
        try:
            shapes = {k: tuple(v.shape) for k, v in build_model(name, num_classes, channels, size, kwargs)
                      .state_dict().items()}
        except Exception:           # a size the architecture cannot take
            continue
        if shapes == {k: tuple(v.shape) for k, v in sd.items()}:
            fits.append(size)
    return fits
