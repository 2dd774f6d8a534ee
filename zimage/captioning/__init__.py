"""Automatic captions: BLIP and Florence-2 through transformers' own classes (no remote code).

models      the captioner catalogue, local folders and hub downloads into models/captioners/
captioners  load a model folder and caption PIL images in batches
worker      the background job: `zimage caption --run-dir DIR`, progress in the run folder
tiny        random-weight tiny BLIP / Florence-2 folders built offline (tests, benchmark)
"""
