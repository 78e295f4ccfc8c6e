"""Robot datasets in and out: LeRobot v3.0 writing, v3.0 and v2.x reading, mp4 video through PyAV, the
embodiment registry and action normalisation between raw units and the model's space."""
