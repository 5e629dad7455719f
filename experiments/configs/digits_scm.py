"""Continuous-time consistency training (sCM, Lu & Song 2025) from scratch on the digits: the main job's U-Net
(smooth time embedding) inside TrigFlow's consistency function on the cosine path, class-conditional, trained by
:func:`jaxgen.losses.scm_loss` on the digits divided by sigma_data = 0.5, sampled in one consistency jump
(``--set sample_steps=2``: jump, re-noise, jump). No guidance: consistency training learns no unconditional
velocity to guide with (MeanFlow builds guidance into training: ``jaxgen train digits_meanflow``)."""

from experiments.images import ImageConfig


def get_config() -> ImageConfig:
    return ImageConfig(name="digits_scm", objective="scm", schedule="cosine", label_dropout=0.0, steps=2000,
                       dropout=0.0, sampler="consistency", sample_steps=1, eval_guidance=1.0, guidance_scales=(1.0,),
                       sample_every=0)
