"""Operations: file-system safety, the history store, device probing, fault points.

Why a layer of its own: these know nothing of photos or models, so every
stage, model and runner may use them, and they import nothing above them.
"""
