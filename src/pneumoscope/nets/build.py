"""A bundle's network: the architecture its meta names, rebuilt from the registry, with its weights."""
from __future__ import annotations

from ..bundle import Bundle, BundleError, ModelMeta
from .registry import MergeOutputs, Normalize, create_ensemble, create_model


def load_network(bundle: Bundle):
    """The XrayNet (PyTorch, eval mode) of `bundle`, its weights loaded strictly."""
    try:
        return build_model(bundle.meta, bundle.state_dict())
    except BundleError as err:
        raise BundleError(f"{bundle.path / 'weights.pt'}: {err}") from None


def build_model(meta: ModelMeta, state_dict: dict):
    """Rebuilds the architecture `meta` names and loads `state_dict` into it (strict)."""
    if meta.members:
        if meta.merge_outputs:
            raise BundleError(f"{meta.name}: an ensemble cannot merge outputs; ship each task's own ensemble")
        model = create_ensemble(meta.members, num_classes=meta.n_outputs)
        _load_weights(model, state_dict, meta)
        for member in model.members:  # one normalisation for all (ensemble.py checks the members share it)
            member.normalize = Normalize(meta.mean, meta.std)
        return model.eval()
    model = create_model(meta.arch, num_classes=meta.n_outputs, pretrained=False)
    _load_weights(model, state_dict, meta)
    model.normalize = Normalize(meta.mean, meta.std)  # the meta's normalisation, not today's registry default
    if meta.merge_outputs:
        model.add_module("merge", MergeOutputs([list(g) for g in meta.merge_outputs]))
    return model.eval()


def _load_weights(model, state_dict: dict, meta: ModelMeta) -> None:
    """load_state_dict (strict), its wall of missing and mismatched keys made one line."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), "")
        raise BundleError(f"{meta.name}: the weights do not fit {meta.arch} with {meta.n_outputs} outputs "
                          f"({reason} {detail[:200]})") from None
