//! The JSON that Nix 2.8's `nix show-derivation` prints for one derivation.

use serde_json::{Map, Value};

use super::Derivation;
use crate::store_path::StoreDir;

pub(super) fn to_json(drv: &Derivation, store_dir: &StoreDir) -> Value {
    let mut outputs = Map::new();
    for (name, o) in &drv.outputs {
        let mut m = Map::new();
        if let Some(p) = &o.path {
            m.insert("path".into(), Value::String(store_dir.display(p)));
        }
        if let Some(f) = &o.fixed {
            m.insert("hashAlgo".into(), Value::String(f.method_algo()));
            m.insert("hash".into(), Value::String(f.hash.to_base16()));
        }
        if let Some(f) = &o.floating {
            m.insert("hashAlgo".into(), Value::String(f.method_algo()));
            if f.impure {
                m.insert("impure".into(), Value::Bool(true));
            }
        }
        outputs.insert(name.clone(), Value::Object(m));
    }
    let input_srcs = drv
        .input_srcs
        .iter()
        .map(|p| Value::String(store_dir.display(p)))
        .collect();
    let mut input_drvs = Map::new();
    for (p, outs) in &drv.input_drvs {
        input_drvs.insert(
            store_dir.display(p),
            Value::Array(outs.iter().cloned().map(Value::String).collect()),
        );
    }
    let mut env = Map::new();
    for (k, v) in &drv.env {
        env.insert(k.clone(), Value::String(v.clone()));
    }
    let mut m = Map::new();
    m.insert("outputs".into(), Value::Object(outputs));
    m.insert("inputSrcs".into(), Value::Array(input_srcs));
    m.insert("inputDrvs".into(), Value::Object(input_drvs));
    m.insert("system".into(), Value::String(drv.platform.clone()));
    m.insert("builder".into(), Value::String(drv.builder.clone()));
    m.insert(
        "args".into(),
        Value::Array(drv.args.iter().cloned().map(Value::String).collect()),
    );
    m.insert("env".into(), Value::Object(env));
    Value::Object(m)
}
