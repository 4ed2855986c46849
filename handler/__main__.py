"""`python -m handler [runpod flags]` starts the RunPod worker."""

from handler.registry import prefetch_default_checkpoint

if __name__ == "__main__":
    # Reading the default checkpoint from the volume overlaps importing torch and diffusers.
    prefetch_default_checkpoint()

    from handler.runpod_worker import main

    main()
