"""Published unbiased test accuracies (%) of the DisEnt paper (docs/method.md, "Published results").

BFFHQ reports accuracy on the bias-conflicting test images.
"""
PUBLISHED = {
    ("cmnist", 0.5): {"vanilla": 35.19, "lff": 52.50, "disent": 65.22},
    ("cmnist", 1.0): {"vanilla": 52.09, "lff": 61.89, "disent": 81.73},
    ("cmnist", 2.0): {"vanilla": 65.86, "lff": 71.03, "disent": 84.79},
    ("cmnist", 5.0): {"vanilla": 82.17, "lff": 84.79, "disent": 89.66},
    ("cifar10c", 0.5): {"vanilla": 23.08, "lff": 28.57, "disent": 29.95},
    ("cifar10c", 1.0): {"vanilla": 25.82, "lff": 33.07, "disent": 36.49},
    ("cifar10c", 2.0): {"vanilla": 30.06, "lff": 39.91, "disent": 41.78},
    ("cifar10c", 5.0): {"vanilla": 39.42, "lff": 50.27, "disent": 51.13},
    ("bffhq", 0.5): {"vanilla": 56.87, "lff": 62.2, "disent": 63.87},
}


def published(dataset: str, ratio_pct: float, method: str):
    """Return the published number of a setting, or None."""
    return PUBLISHED.get((dataset, float(ratio_pct)), {}).get(method)
