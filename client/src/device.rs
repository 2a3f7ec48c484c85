//! Choosing where the model runs: burn's flex backend on the CPU, or wgpu on a GPU.
//!
//! burn 0.22 picks the backend from a [`Device`] value at run time, so this module only has
//! to decide which `Device` to build. `auto` takes a real GPU when wgpu finds one and flex
//! otherwise: a software Vulkan rasterizer (lavapipe/llvmpipe) is slower than flex on the
//! same cores, so it is only used when asked for explicitly (which is how CI exercises the
//! wgpu code path on machines without a GPU).
//!
//! Adapter discovery goes through burn's own enumeration (the same code path the wgpu
//! runtime uses to resolve a device), so the adapter we name is the adapter that runs. No
//! Vulkan driver at all simply means an empty list; anything that panics inside the graphics
//! stack is caught and reported as a [`DeviceError`] instead of taking the process down.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::str::FromStr;

use burn::backend::{CubeDevice, DispatchDevice, WgpuDeviceKind};
use burn::tensor::{Device, DeviceType};
use thiserror::Error;

/// Which backend the user asked for (`--device auto|cpu|wgpu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DeviceChoice {
    /// A real GPU through wgpu if there is one, else the CPU.
    #[default]
    Auto,
    /// burn's pure-Rust CPU backend (flex).
    Cpu,
    /// wgpu, even on a software adapter.
    Wgpu,
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceChoice::Auto => "auto",
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Wgpu => "wgpu",
        })
    }
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "wgpu" => Ok(DeviceChoice::Wgpu),
            other => Err(DeviceError::UnknownChoice(other.to_string())),
        }
    }
}

/// Which backend a [`SelectedDevice`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Flex,
    Wgpu,
}

/// A device ready for tensors, with a label for logs and status reports.
#[derive(Debug, Clone)]
pub struct SelectedDevice {
    pub device: Device,
    /// e.g. `cpu (flex)` or `wgpu (llvmpipe (LLVM 15.0.6, 256 bits), CPU software adapter)`.
    pub label: String,
    pub backend: BackendKind,
}

/// Why no device could be selected.
#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("unknown device `{0}`: expected auto, cpu or wgpu")]
    UnknownChoice(String),
    #[error(
        "--device wgpu was requested but wgpu found no adapter (no Vulkan/GL driver? on Debian, \
         `apt-get install mesa-vulkan-drivers` provides a software one)"
    )]
    NoWgpuAdapter,
    #[error("wgpu adapter {adapter} could not be opened: {reason}")]
    WgpuInit { adapter: String, reason: String },
}

/// Resolves the user's choice into a device. `Cpu` never fails; `Auto` falls back to the CPU
/// when no real GPU is present or the GPU cannot be opened; `Wgpu` fails with a typed error
/// when there is no adapter at all.
pub fn select_device(choice: DeviceChoice) -> Result<SelectedDevice, DeviceError> {
    match choice {
        DeviceChoice::Cpu => Ok(flex()),
        DeviceChoice::Auto => {
            let adapters = wgpu_adapters();
            let Some(adapter) = pick(&adapters, false) else {
                return Ok(flex());
            };
            match open(adapter) {
                Ok(selected) => Ok(selected),
                Err(err) => {
                    tracing::warn!("{err}; falling back to the CPU");
                    Ok(flex())
                }
            }
        }
        DeviceChoice::Wgpu => {
            let adapters = wgpu_adapters();
            let adapter = pick(&adapters, true).ok_or(DeviceError::NoWgpuAdapter)?;
            open(adapter)
        }
    }
}

/// Whether wgpu sees any adapter at all, software rasterizers included. Tests use this to
/// decide whether the wgpu path can be exercised on this machine.
pub fn wgpu_available() -> bool {
    !wgpu_adapters().is_empty()
}

fn flex() -> SelectedDevice {
    SelectedDevice {
        device: Device::flex(),
        label: "cpu (flex)".to_string(),
        backend: BackendKind::Flex,
    }
}

/// One wgpu adapter as burn enumerates it.
#[derive(Debug, Clone)]
struct Adapter {
    kind: WgpuDeviceKind,
    device: Device,
}

/// Every adapter burn's wgpu runtime can reach, on the graphics API it would settle on.
fn wgpu_adapters() -> Vec<Adapter> {
    let devices = catch_unwind(|| Device::enumerate(DeviceType::Wgpu).into_vec());
    let Ok(devices) = devices else {
        tracing::warn!("enumerating wgpu adapters panicked; treating wgpu as unavailable");
        return Vec::new();
    };
    devices
        .into_iter()
        .filter_map(|device| {
            let kind = match device.as_dispatch() {
                DispatchDevice::Cube(CubeDevice::Wgpu(wgpu)) => wgpu.kind.clone(),
                _ => return None,
            };
            Some(Adapter { kind, device })
        })
        .collect()
}

/// Preference order: discrete, integrated, virtual GPU; then (only when `allow_software`)
/// an unclassified adapter and finally a CPU software rasterizer.
fn pick(adapters: &[Adapter], allow_software: bool) -> Option<&Adapter> {
    let rank = |kind: &WgpuDeviceKind| match kind {
        WgpuDeviceKind::DiscreteGpu(_) => Some(0),
        WgpuDeviceKind::IntegratedGpu(_) => Some(1),
        WgpuDeviceKind::VirtualGpu(_) => Some(2),
        WgpuDeviceKind::Other(_) if allow_software => Some(3),
        WgpuDeviceKind::Cpu if allow_software => Some(4),
        _ => None,
    };
    adapters
        .iter()
        .filter_map(|a| rank(&a.kind).map(|r| (r, a)))
        .min_by_key(|(r, _)| *r)
        .map(|(_, a)| a)
}

fn kind_label(kind: &WgpuDeviceKind) -> String {
    match kind {
        WgpuDeviceKind::DiscreteGpu(i) => format!("discrete GPU {i}"),
        WgpuDeviceKind::IntegratedGpu(i) => format!("integrated GPU {i}"),
        WgpuDeviceKind::VirtualGpu(i) => format!("virtual GPU {i}"),
        WgpuDeviceKind::Cpu => "CPU software adapter".to_string(),
        WgpuDeviceKind::Other(i) => format!("unclassified adapter {i}"),
        other => format!("{other:?}"),
    }
}

/// Opens the adapter now (so a broken driver fails here, not in the middle of a round) and
/// reads its name for the label.
fn open(adapter: &Adapter) -> Result<SelectedDevice, DeviceError> {
    let kind = kind_label(&adapter.kind);
    let device = adapter.device.clone();
    let identity = catch_unwind(AssertUnwindSafe(|| device.identity()));
    match identity {
        Ok(identity) => {
            let name = identity
                .map(|id| id.name)
                .unwrap_or_else(|| "unnamed adapter".to_string());
            Ok(SelectedDevice {
                device: adapter.device.clone(),
                label: format!("wgpu ({name}, {kind})"),
                backend: BackendKind::Wgpu,
            })
        }
        Err(panic) => Err(DeviceError::WgpuInit {
            adapter: kind,
            reason: panic_message(panic.as_ref()),
        }),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "the graphics driver panicked".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_display_round_trip() {
        for choice in [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Wgpu] {
            assert_eq!(choice.to_string().parse::<DeviceChoice>().unwrap(), choice);
        }
        assert_eq!(
            " WGPU ".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Wgpu
        );
        let err = "cuda".parse::<DeviceChoice>().unwrap_err();
        assert!(err.to_string().contains("cuda"), "{err}");
    }

    #[test]
    fn cpu_is_flex() {
        let selected = select_device(DeviceChoice::Cpu).unwrap();
        assert_eq!(selected.backend, BackendKind::Flex);
        assert_eq!(selected.label, "cpu (flex)");
    }

    #[test]
    fn auto_never_fails_and_explicit_wgpu_matches_availability() {
        let auto = select_device(DeviceChoice::Auto).unwrap();
        assert!(!auto.label.is_empty());
        match select_device(DeviceChoice::Wgpu) {
            Ok(selected) => {
                assert!(wgpu_available());
                assert_eq!(selected.backend, BackendKind::Wgpu);
                assert!(selected.label.starts_with("wgpu ("), "{}", selected.label);
            }
            Err(DeviceError::NoWgpuAdapter) => assert!(!wgpu_available()),
            Err(other) => panic!("unexpected error: {other}"),
        }
    }

    #[test]
    fn software_adapters_only_when_asked() {
        let lavapipe = Adapter {
            kind: WgpuDeviceKind::Cpu,
            device: Device::flex(),
        };
        assert!(pick(std::slice::from_ref(&lavapipe), false).is_none());
        assert!(pick(std::slice::from_ref(&lavapipe), true).is_some());
        let gpu = Adapter {
            kind: WgpuDeviceKind::IntegratedGpu(0),
            device: Device::flex(),
        };
        let both = [lavapipe, gpu];
        let picked = pick(&both, true).unwrap();
        assert_eq!(picked.kind, WgpuDeviceKind::IntegratedGpu(0));
    }
}
