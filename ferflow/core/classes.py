"""The FER-2013 emotion classes: names, order and the synonyms seen in the wild."""

from __future__ import annotations

from collections.abc import Mapping

# Order matches the FER-2013 folder layout sorted alphabetically, which is how
# every seed project (and Keras' image_dataset_from_directory) numbers them.
FER_CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")

# The `emotion` codes of the original fer2013.csv (Kaggle "Challenges in Representation
# Learning"): NOT alphabetical - 4 is sad and 6 is neutral.
FER2013_CSV_LABELS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

# Folder names used by other FER-2013 re-packagings (e.g. seed 000's `images/` layout).
CLASS_SYNONYMS: dict[str, str] = {
    "anger": "angry",
    "angry": "angry",
    "disgust": "disgust",
    "disgusted": "disgust",
    "fear": "fear",
    "fearful": "fear",
    "scared": "fear",
    "happy": "happy",
    "happiness": "happy",
    "neutral": "neutral",
    "sad": "sad",
    "sadness": "sad",
    "surprise": "surprise",
    "surprised": "surprise",
}


def canonical_class(name: str, class_map: Mapping[str, str] | None = None) -> str:
    """Map a folder/class name to its canonical FER-2013 name (case-insensitive).

    `class_map` (the `data.class_map` param) is consulted first, so it can also
    re-route a known synonym. Raises ValueError naming the unknown class and listing
    the accepted names.
    """
    key = name.strip().lower()
    if class_map:
        lowered = {k.strip().lower(): v for k, v in class_map.items()}
        if key in lowered:
            target = lowered[key]
            if target not in FER_CLASSES:
                raise ValueError(f"data.class_map maps {name!r} to {target!r}: expected one of {', '.join(FER_CLASSES)}")
            return target
    if key in CLASS_SYNONYMS:
        return CLASS_SYNONYMS[key]
    accepted = sorted(set(CLASS_SYNONYMS) | {k.lower() for k in (class_map or {})})
    raise ValueError(
        f"unknown class folder {name!r}: expected one of {', '.join(accepted)} "
        "(case-insensitive), or map it with the `data.class_map` param, e.g. {" + f"{name}: happy" + "}"
    )
