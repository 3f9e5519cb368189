"""Vision models. Importing this package registers every model family with timm (and ours)."""
