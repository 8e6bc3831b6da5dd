"""Weights in and out: checkpoints (ditkit's own, atomic and resumable), conversion from the authors', SiT's, REPA's,
LightningDiT's and PixArt-alpha's layouts, diffusers folders, and pretrained-file lookup."""
