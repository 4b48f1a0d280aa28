"""Personalized reward model (PersRM) training: a LoRA adapter on the base
model, trained with PAD's DPO-style objective (`pad train`), and synthetic
preference pairs built with the model itself (`pad data synth`)."""
