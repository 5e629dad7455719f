"""MeanFlow on the digits: a flow-map U-Net ``u(x, r, t | y, w)`` (the main job's network with the interval
``t - r`` and the guidance scale ``w`` as extra inputs) trained from scratch with classifier-free guidance built into
training (:func:`jaxgen.losses.meanflow_loss`, ``w ~ U[1, 4]``), sampled guided at w = 2 in ONE network call
(``sampler="flow_map"``, 1 step). ``--set sample_steps=2`` jumps twice; ``--set sampler=heun --set sample_steps=20``
integrates its diagonal ``u(x, t, t | y, w)`` like a flow-matching field; ``--set objective=shortcut`` trains the same
network as a shortcut model, ``--set network=dit`` a DiT instead of the U-Net."""

from experiments.images import ImageConfig


def get_config() -> ImageConfig:
    return ImageConfig(name="digits_meanflow", objective="meanflow", steps=2000, dropout=0.0, sampler="flow_map",
                       sample_steps=1, guidance_scales=(1.0, 2.0, 3.0, 4.0), sample_every=0)
