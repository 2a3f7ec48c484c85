//! The learning rate at each optimizer step: linear warm-up, then constant or half-cosine
//! decay, as Hugging Face's `get_constant_schedule_with_warmup` and
//! `get_cosine_schedule_with_warmup` define them (so runs compare with PyTorch ones).

use fedcore::{LrSchedule, TrainingSpec};

/// Learning rate of optimizer step `step` (0-based) out of `spec.local_steps`.
///
/// Warm-up: `lr · (step + 1) / (warmup + 1)`, so the first step already moves (HF's
/// `step / warmup` would waste step 0 with a zero rate). Cosine: from `lr` at the first
/// step after warm-up down to `min_lr_ratio · lr` at the last step.
pub fn learning_rate(spec: &TrainingSpec, step: usize) -> f64 {
    let peak = spec.learning_rate;
    let warmup = spec.warmup_steps;
    if step < warmup {
        return peak * (step + 1) as f64 / (warmup + 1) as f64;
    }
    match spec.lr_schedule {
        LrSchedule::Constant => peak,
        LrSchedule::Cosine => {
            let decay_steps = spec.local_steps.saturating_sub(warmup).max(1);
            let progress = if decay_steps == 1 {
                0.0
            } else {
                (step - warmup) as f64 / (decay_steps - 1) as f64
            };
            let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos());
            let floor = spec.min_lr_ratio;
            peak * (floor + (1.0 - floor) * cosine)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(steps: usize, warmup: usize, schedule: LrSchedule, floor: f64) -> TrainingSpec {
        TrainingSpec {
            local_steps: steps,
            learning_rate: 1.0,
            warmup_steps: warmup,
            lr_schedule: schedule,
            min_lr_ratio: floor,
            ..TrainingSpec::default()
        }
    }

    #[test]
    fn warmup_then_cosine_to_the_floor() {
        let s = spec(13, 3, LrSchedule::Cosine, 0.1);
        let lrs: Vec<f64> = (0..13).map(|i| learning_rate(&s, i)).collect();
        assert_eq!(&lrs[..3], &[0.25, 0.5, 0.75]);
        assert_eq!(lrs[3], 1.0);
        // Halfway through the 10 decay steps (4.5 of 9): midway between 1 and the floor.
        let mid = 0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * 4.0 / 9.0).cos());
        assert!((lrs[7] - mid).abs() < 1e-12);
        assert!((lrs[12] - 0.1).abs() < 1e-12);
        assert!(lrs[3..].windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn constant_after_warmup_and_single_step_runs() {
        let s = spec(5, 1, LrSchedule::Constant, 0.0);
        let lrs: Vec<f64> = (0..5).map(|i| learning_rate(&s, i)).collect();
        assert_eq!(lrs, vec![0.5, 1.0, 1.0, 1.0, 1.0]);
        let one = spec(1, 0, LrSchedule::Cosine, 0.0);
        assert_eq!(learning_rate(&one, 0), 1.0);
    }
}
