"""The pipeline's stages, one module per dvc.yaml stage (`python -m tasks.<stage>`), plus promote and predict.

What they share lives in tasks.lib. Nothing here knows of Prefect.
"""
