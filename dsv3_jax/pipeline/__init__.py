"""Pipeline parallelism: schedules as data (1F1B, ZB1P, DualPipe, DualPipeV), their simulator and lockstep form."""
