"""The official placeholder ids shared by the processor and the model (negative, so never text ids)."""
IGNORE_ID = -100                                  # label of positions without loss
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = -200, -201       # `<image>` / `<video>` before expansion
VISUAL_ATOM_ID = -300                             # one visual token (2x2 patches) after expansion
IMAGE_START_ID, IMAGE_END_ID, VIDEO_START_ID, VIDEO_END_ID = -301, -302, -303, -304  # last 4 VET rows
INDICATOR_IDS = (IMAGE_START_ID, IMAGE_END_ID, VIDEO_START_ID, VIDEO_END_ID)
