//! A bounded LRU cache for metadata tables (L2 tables, refcount blocks), keyed by host offset.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

pub struct LruCache<V> {
    capacity: usize,
    tick: u64,
    map: HashMap<u64, (Arc<V>, u64)>,
    order: BTreeMap<u64, u64>,
}

impl<V> LruCache<V> {
    pub fn new(capacity: usize) -> Self {
        LruCache {
            capacity: capacity.max(1),
            tick: 0,
            map: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    pub fn get(&mut self, key: u64) -> Option<Arc<V>> {
        self.tick += 1;
        let tick = self.tick;
        let (v, t) = self.map.get_mut(&key)?;
        self.order.remove(t);
        *t = tick;
        self.order.insert(tick, key);
        Some(v.clone())
    }

    pub fn insert(&mut self, key: u64, value: Arc<V>) {
        self.tick += 1;
        if let Some((_, t)) = self.map.remove(&key) {
            self.order.remove(&t);
        }
        while self.map.len() >= self.capacity {
            let Some((&t, &k)) = self.order.iter().next() else {
                break;
            };
            self.order.remove(&t);
            self.map.remove(&k);
        }
        self.map.insert(key, (value, self.tick));
        self.order.insert(self.tick, key);
    }

    pub fn remove(&mut self, key: u64) {
        if let Some((_, t)) = self.map.remove(&key) {
            self.order.remove(&t);
        }
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let mut c = LruCache::new(2);
        c.insert(1, Arc::new(1));
        c.insert(2, Arc::new(2));
        assert!(c.get(1).is_some());
        c.insert(3, Arc::new(3));
        assert!(c.get(2).is_none());
        assert!(c.get(1).is_some());
        assert!(c.get(3).is_some());
        assert_eq!(c.len(), 2);
    }
}
