def make_scenes(*a, **k):  # placeholder, being written
    raise NotImplementedError


def make_feature_maps(*a, **k):  # placeholder
    raise NotImplementedError
