"""DreamBooth adapter training from a source checkout; the same as ``diffadapt train`` (see its --help).

    accelerate launch training/train_dreambooth.py --pretrained_model_name_or_path path/to/sd15 \
        --instance_data_dir dog/ --instance_prompt "a photo of sks dog" --output_dir out/sks --max_train_steps 400
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    from diffadapt.train import main

    sys.exit(main(prog="train_dreambooth.py"))
