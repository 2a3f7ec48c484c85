//! Test helper: every float parameter of a module with its path and values, to check what
//! training changed and what it left bit-identical.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;

#[derive(Default)]
struct Collector {
    path: Vec<String>,
    out: Vec<(String, Vec<f32>)>,
}

impl ModuleVisitor for Collector {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let values = param
            .val()
            .into_data()
            .try_into_vec_as::<f32>()
            .expect("f32 parameter");
        self.out.push((self.path.join("."), values));
    }
}

/// `(path, values)` of every float parameter, in traversal order.
pub(crate) fn parameters<M: Module>(module: &M) -> Vec<(String, Vec<f32>)> {
    let mut c = Collector::default();
    module.visit(&mut c);
    c.out
}
