"""RL for the recipe's last stage: rewards, GRPO advantages, the policy loss."""
