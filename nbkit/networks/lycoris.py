"""LyCORIS networks (kohya ``network_module = "lycoris.kohya"``): LoHa, LoKr, LoCon, DoRA-style weight decomposition.

The algorithms are the ``lycoris-lora`` package's own module classes (``lycoris/modules/loha.py::LohaModule``,
``lokr.py::LokrModule``, ``locon.py::LoConModule``: their parameters, init, scale, dropouts, DoRA and
forward), so a file trained here is what ``--network_module lycoris.kohya`` writes. What nbkit does itself:

- picks the modules as ``lycoris/kohya.py::create_network`` + ``LycorisNetworkKohya.__init__`` do
  (``create_modules``/``create_single_module``, presets of ``lycoris/config.py``): inside every module
  whose class is in the preset's target list, every ``Linear``/``Conv`` descendant; plus the modules the
  preset names (``conv_in``, ``conv_out``, ``time_embedding.linear_1/2`` in the default ``full``);
  Linear and 1x1 convs get ``network_dim``/``network_alpha``, larger convs ``conv_dim``/``conv_alpha``
  (default: ``network_dim``/``network_alpha``; 0 or a preset without convs: none). ``create_network``
  itself is not called: it keeps the preset in class attributes (``LycorisNetworkKohya.apply_preset``);
- names the modules with kohya's stems (:func:`nbkit.formats.lycoris.lycoris_stem`: ``text_model_`` in
  text-encoder stems, which transformers >= 5.6 dropped from ``CLIPTextModel``'s module paths). kohya's
  U-Net (``library/original_unet.py``) calls its attention class ``CrossAttention``, diffusers ``Attention``
  (the ``attn-only`` preset names kohya's);
- registers every LyCORIS module as a child (``lycoris``) of the layer it adapts, so its parameters are
  the base model's (optimizer groups, resume state, DDP) while LyCORIS's ``apply_to`` patches the forward.

``network_args`` are parsed and checked by :func:`check_network_args` (before anything loads).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Mapping

import torch
from torch import nn

from nbkit.errors import ConfigError
from nbkit.formats.lycoris import group_lycoris, lycoris_stem, resolve_stems
from nbkit.networks.lycoris_args import ALGOS, check_network_args, preset_targets

#: kohya's U-Net class names (library/original_unet.py) -> the diffusers classes of the same blocks
CLASS_ALIASES = {"Attention": "CrossAttention"}
#: module classes of kohya's SDXL U-Net (library/sdxl_original_unet.py) a preset can name; diffusers'
#: TimestepEmbedding (time_embedding, add_embedding) is an nn.Sequential there (time_embed, label_emb)
KOHYA_SDXL_UNET_CLASSES = frozenset({"ResnetBlock2D", "Downsample2D", "Upsample2D", "CrossAttention", "GEGLU",
                                     "FeedForward", "BasicTransformerBlock", "Transformer2DModel"})  # fmt: skip
ADAPTER = "lycoris"  # attribute of the adapted layer that holds its LyCORIS module


# ----------------------------------------------------------------------------- module selection


def lycoris_targets(
    model: nn.Module, part: str, preset: Mapping, rename: Callable[[str], str | None] | None = None
) -> list[tuple[str, nn.Module]]:
    """``[(path, layer)]`` LyCORIS adapts in a model part for a preset, in its order
    (``lycoris/kohya.py::LycorisNetworkKohya.__init__``: ``create_modules`` / ``create_modules_``).

    ``rename``: the module name the kohya model has for a path (None: no such module), for the SDXL
    U-Net, which kohya builds as ``library/sdxl_original_unet.py`` with SGM names: the preset's names
    and ``exclude_name`` patterns are matched against those (``conv_in``, ``conv_out`` and
    ``time_embedding.linear_1/2`` of the ``full`` preset name nothing there: kohya's are
    ``input_blocks.0.0``, ``out.2``, ``time_embed.0/2``), while the target classes
    (``Transformer2DModel``, ``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D``) carry the same class
    names and hold the same Linear/Conv layers in both U-Nets; a diffusers class kohya's SDXL U-Net
    does not have (``TimestepEmbedding``) matches nothing."""
    kind = "unet" if part == "unet" else "text_encoder"
    classes = set(preset.get(f"{kind}_target_module") or [])
    patterns = list(preset.get(f"{kind}_target_name") or [])
    excluded = list(preset.get("exclude_name") or [])
    match: Callable = fnmatch.fnmatch if preset.get("use_fnmatch") else (lambda p, n: re.match(p, n) is not None)

    def kohya_name(path: str) -> str | None:
        return path if rename is None or not path else rename(path)

    def is_excluded(name: str | None) -> bool:
        return bool(name) and (name in excluded or any(match(p, name) for p in excluded))

    def named(name: str | None) -> bool:
        return name is not None and (name in patterns or any(match(p, name) for p in patterns))

    found: dict[str, nn.Module] = {}  # the same path twice is one module (LyCORIS 4.1.3 asserts instead)
    for name, module in model.named_modules():
        kname = kohya_name(name)
        if is_excluded(kname) or ADAPTER in name.split("."):
            continue
        cls = type(module).__name__
        cls = CLASS_ALIASES.get(cls, cls) if cls not in classes else cls
        if rename is not None and cls not in KOHYA_SDXL_UNET_CLASSES:
            cls = None
        if cls in classes and not named(kname):
            for path, child in module.named_modules(prefix=name):
                if (path != name and not is_excluded(kohya_name(path)) and ADAPTER not in path.split(".")
                        and _layer_kind(child)):  # fmt: skip
                    found.setdefault(path, child)
        elif named(kname) and _layer_kind(module):
            found.setdefault(name, module)
    return list(found.items())


def _layer_kind(module: nn.Module) -> str | None:
    """``linear``, ``conv1x1``, ``conv`` or None (``create_single_module``: only the first kernel size counts)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv1x1" if module.kernel_size[0] == 1 else "conv"
    return None


# ----------------------------------------------------------------------------- the plug-in


class LycorisNetwork:
    check_config = staticmethod(lambda config, where="config": check_network_args(config, where))
    """kohya ``lycoris.kohya`` (LoHa, LoKr, LoCon; DoRA with ``dora_wd``) as a network plug-in
    (:mod:`nbkit.networks.base`): the lycoris-lora package's modules in kohya's module set and names."""

    module = "lycoris.kohya"

    def __init__(self, config) -> None:
        self.config = config
        self.args = check_network_args(config)
        self.models: dict[str, nn.Module] = {}
        self.loras: dict[str, dict[str, nn.Module]] = {}  # part -> {stem: LyCORIS module}
        self.continued: dict[str, str] = {}  # stem -> algo of a network_weights file

    # ---- inject
    def inject(self, models: Mapping[str, nn.Module]) -> None:
        """The preset's modules with the config's ranks, or a LyCORIS file's modules and weights
        (``network_weights``: training continues from it, at the file's ranks)."""
        self.models = {part: m for part, m in models.items() if m is not None}
        if self.config.network_weights:
            self._load(self.config.network_weights)
            return
        trains = {"unet": self.config.train_unet, "text_encoder": self.config.train_text_encoder,
                  "text_encoder_2": self.config.train_text_encoder}  # fmt: skip
        preset = preset_targets(self.args.preset)
        sdxl = "text_encoder_2" in self.models
        # SDXL: kohya's LyCORIS sees the SAI-layout U-Net (sdxl_original_unet.py), so U-Net modules are picked
        # and named by their SGM paths (lora_unet_input_blocks_4_1_...; formats/kohya_sdxl.py)
        unet_config = dict(self.models["unet"].config) if sdxl and "unet" in self.models else None
        # LyCORIS builds the text encoders' modules first, then the U-Net's (the init RNG order)
        for part in ("text_encoder", "text_encoder_2", "unet"):
            model = self.models.get(part)
            if model is None or not trains[part]:
                continue
            made = {}
            config = unet_config if part == "unet" else None
            for path, layer in lycoris_targets(model, part, preset, _sgm_renamer(config)):
                stem = lycoris_stem(part, path, sdxl=sdxl, unet_config=config)
                lora = self._make(stem, layer, bool(preset.get("enable_conv", True)))
                if lora is not None:
                    made[lora.lora_name] = self._attach(lora, layer)
            if made:  # a preset may leave a part out (unet-only): LyCORIS then adapts none of it either
                self.loras[part] = made
        if not self.loras:
            raise ValueError(f"preset={self.args.preset}: no LyCORIS targets in {', '.join(self.models)}: pick another "
                             "preset (full, attn-mlp, ...)")

    def _make(self, stem: str, layer: nn.Module, enable_conv: bool):
        """``create_single_module``: ranks by layer kind, then the algo's LyCORIS module class."""
        import lycoris.modules as lycoris_modules

        config, args = self.config, self.args
        kind = _layer_kind(layer)
        conv_dim = 0 if not enable_conv else (config.network_dim if args.conv_dim is None else args.conv_dim)
        if kind in ("linear", "conv1x1"):
            dim, alpha = config.network_dim, config.network_alpha
        elif conv_dim > 0:
            dim, alpha = conv_dim, config.network_alpha if args.conv_alpha is None else args.conv_alpha
        else:
            return None
        cls = getattr(lycoris_modules, ALGOS[args.algo])
        return cls(stem, layer, multiplier=1.0, lora_dim=dim, alpha=alpha, dropout=args.dropout,
                   rank_dropout=args.rank_dropout, module_dropout=args.module_dropout, use_tucker=args.use_tucker,
                   use_scalar=args.use_scalar, decompose_both=args.decompose_both, factor=args.factor,
                   weight_decompose=args.dora_wd, wd_on_out=args.wd_on_output, full_matrix=args.full_matrix,
                   bypass_mode=args.bypass_mode, rs_lora=args.rs_lora,
                   unbalanced_factorization=args.unbalanced_factorization)  # fmt: skip

    @staticmethod
    def _attach(lora: nn.Module, layer: nn.Module) -> nn.Module:
        """Patch the layer's forward (LyCORIS ``apply_to``) and register the module under it, in fp32 on its device."""
        if hasattr(layer, ADAPTER):
            raise ValueError(f"{lora.lora_name}: the layer already has a LyCORIS module: start from a fresh model")
        if type(lora).__name__ == "LokrModule" and lora.rank_dropout and layer.weight.device.type != "cpu":
            # lycoris/modules/lokr.py::LokrModule.get_weight draws the mask with torch.rand(n) on the CPU and
            # multiplies the weight on the GPU by it (LoHa and LoCon draw it on the weight's device)
            raise ConfigError("network_args: rank_dropout with a LoKr network: LyCORIS 4.1.3's LoKr builds its "
                              "rank-dropout mask on the CPU, which fails on a GPU; remove rank_dropout or use algo=loha")
        lora.to(device=layer.weight.device, dtype=torch.float32)
        lora.apply_to()
        layer.add_module(ADAPTER, lora)
        return lora

    def _load(self, path: str) -> None:
        """kohya ``create_network_from_weights`` for LyCORIS: each module rebuilt from the file by its
        class's ``make_module_from_state_dict`` (ranks, factors, tucker and DoRA read from the tensors)."""
        import lycoris.modules as lycoris_modules
        from safetensors.torch import load_file

        if not str(path).endswith(".safetensors"):
            raise ValueError(f"{path}: network_weights must be a LyCORIS/kohya .safetensors file")
        state = load_file(str(path))
        modules = group_lycoris(state, str(path))
        for stem, module in modules.items():  # LyCORIS needs an alpha; kohya's rule: none means alpha = rank
            state.setdefault(f"{stem}.alpha", torch.tensor(float(module.rank)))
        names = {part: [n for n, _ in m.named_modules()] for part, m in self.models.items()}
        names.update({p: None for p in ("unet", "text_encoder", "text_encoder_2") if p not in names})
        sdxl = "text_encoder_2" in self.models and "unet" in self.models
        where = resolve_stems(modules, names, str(path), dict(self.models["unet"].config) if sdxl else None)
        args = self.args
        with torch.no_grad():
            for stem, (part, module_path) in where.items():
                layer = self.models[part].get_submodule(module_path)
                lora = _module_from_file(lycoris_modules, stem, layer, modules[stem], state)
                # the file fixes the shapes; the dropouts are the run's (kohya: network_args)
                lora.rank_dropout, lora.module_dropout = args.rank_dropout, args.module_dropout
                self.loras.setdefault(part, {})[stem] = self._attach(lora, layer)
                self.continued[stem] = modules[stem].algo
        algos = sorted(set(self.continued.values()))
        wanted = "locon" if args.algo == "lora" else args.algo
        if algos != [wanted]:
            print(f"note: network_weights {path} holds {'/'.join(algos)} modules; training continues with them "
                  f"(network_args algo={args.algo} is not used)")

    # ---- the contract
    def parameters(self, part: str) -> list[nn.Parameter]:
        trains = {"unet": self.config.train_unet, "text_encoder": self.config.train_text_encoder,
                  "text_encoder_2": self.config.train_text_encoder}  # fmt: skip
        if not trains.get(part):
            return []
        return [p for lora in self.loras.get(part, {}).values() for p in lora.parameters()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every module's LyCORIS tensors (``custom_state_dict``: ``scalar`` folded in) under its kohya stem."""
        out: dict[str, torch.Tensor] = {}
        for loras in self.loras.values():
            for stem, lora in loras.items():
                for name, tensor in lora.custom_state_dict().items():
                    out[f"{stem}.{name}"] = tensor.detach().clone().contiguous()
        if not out:
            raise ValueError("the LyCORIS network has no modules: was it injected?")
        return out

    def metadata(self, state: Mapping[str, torch.Tensor] | None = None) -> dict[str, object]:
        """kohya's ss_network_* for lycoris.kohya: the config's dim/alpha and the network_args as written
        (``train_network.py``: ``ss_network_args = json.dumps(net_kwargs)``); continued from a file, the
        ranks and alphas the modules have (``"Dynamic"`` when they differ) and the file's algo."""
        config = self.config
        written = dict(self.args.written)
        dim, alpha = config.network_dim, config.network_alpha
        if self.continued:
            linear, conv = self._ranks()
            dim, alpha = linear if linear[0] is not None else (dim, alpha)
            if conv[0] is not None:
                written.update(conv_dim=str(conv[0]), conv_alpha=str(conv[1]))
            algos = set(self.continued.values())
            if len(algos) == 1:
                written["algo"] = algos.pop()
        return {"network_module": self.module, "network_dim": dim, "network_alpha": alpha, "conv_dim": None,
                "conv_alpha": None, "network_args": written}  # fmt: skip

    def _ranks(self) -> tuple[tuple, tuple]:
        """``((dim, alpha), (conv_dim, conv_alpha))`` of the modules: Linear/1x1 vs larger convs."""
        groups: dict[bool, tuple[set, set]] = {False: (set(), set()), True: (set(), set())}
        for loras in self.loras.values():
            for lora in loras.values():
                is_conv = _layer_kind(lora.org_module[0]) == "conv"
                groups[is_conv][0].add(int(lora.lora_dim))
                groups[is_conv][1].add(float(lora.alpha))

        def one(values: set):
            return next(iter(values)) if len(values) == 1 else "Dynamic"

        return tuple((one(d), one(a)) if d else (None, None) for d, a in (groups[False], groups[True]))


def _sgm_renamer(unet_config: Mapping | None) -> Callable[[str], str | None] | None:
    """diffusers U-Net path -> the SGM path kohya's SDXL U-Net has (None where it has no such module)."""
    if unet_config is None:
        return None
    from nbkit.formats.kohya_sdxl import sgm_unet_path

    def rename(path: str) -> str | None:
        try:
            return sgm_unet_path(path, unet_config)
        except ValueError:
            return None

    return rename


def _module_from_file(lycoris_modules, stem: str, layer: nn.Module, module, state: Mapping[str, torch.Tensor]):
    """One LyCORIS module rebuilt from a file by its class's ``make_module_from_state_dict``, with two
    cases LyCORIS 4.1.3 gets wrong done here: a DoRA scale is set after the build (its loader always
    assumes ``wd_on_output=True``), and a tucker LoKr is built with its true rank (its loader reads the
    rank from the wrong axis of ``lokr_w2_a``, which is ``[rank, b]`` there)."""
    cls = getattr(lycoris_modules, ALGOS[module.algo])
    params = list(cls.extract_state_dict(state, stem))
    dora = params[-1]
    params[-1] = None  # weight_list ends with dora_scale in every class
    if module.algo == "lokr" and "lokr_t2" in module.tensors:
        lora = _tucker_lokr(cls, stem, layer, module, float(params[-2]))
    else:
        lora = cls.make_module_from_state_dict(stem, layer, *params)
    if dora is not None:
        weight = layer.weight
        lora.wd, lora.dora_norm_dims = True, weight.dim() - 1
        lora.wd_on_out = dora.shape[0] == weight.shape[0] and math.prod(dora.shape[1:]) == 1
        lora.dora_scale = nn.Parameter(dora.detach().clone().float())
    return lora


def _tucker_lokr(cls, stem: str, layer: nn.Module, module, alpha: float):
    t = module.tensors
    rank = int(t["lokr_t2"].shape[0])
    w1 = t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
    for factor in dict.fromkeys((-1, *w1, *t["lokr_w2_a"].shape[1:], *t["lokr_w2_b"].shape[1:])):
        lora = cls(stem, layer, 1, rank, alpha, use_tucker=True, decompose_both="lokr_w1" not in t, factor=factor)
        ours = {k: v.shape for k, v in lora.custom_state_dict().items() if k in t}
        if ours == {k: v.shape for k, v in t.items()}:
            for name, tensor in t.items():
                getattr(lora, name).copy_(tensor)
            return lora
    raise ValueError(f"{stem}: no LoKr factor rebuilds this tucker module's shapes "
                     f"({', '.join(f'{k} {tuple(v.shape)}' for k, v in t.items())})")
