//! The slots and the retiring workers as the supervisor keeps them, with a record of what
//! changed: every mutable access marks the slot it may change (an iteration over all of them
//! marks them all), so that the invariant pipeline after an event needs to look again only at
//! the slots marked since the last one (see `Supervisor::settle`). Reads are free. Marking is
//! conservative: a slot reached through a mutable path is marked whether or not it changed.
//!
//! Also the minimum tree of per-slot deadlines, which says in O(log N) when the next one is
//! and finds the slots whose deadline came.

use std::ops::{Deref, Index, IndexMut};
use std::time::Instant;

use super::{Proc, Slot};

/// Which slots were marked since the last [`clear`](Touched::clear): a list without repeats,
/// or all of them.
#[derive(Debug, Clone, Default)]
pub(super) struct Touched {
    list: Vec<usize>,
    /// `seen[slot]`: `slot` is in `list`.
    seen: Vec<bool>,
    all: bool,
    /// Marks taken so far, ever (not cleared): a settle compares it to see whether a step marked
    /// a slot after an earlier one read the marks.
    marks: u64,
}

impl Touched {
    fn mark(&mut self, slot: usize) {
        self.marks = self.marks.wrapping_add(1);
        if self.all {
            return;
        }
        if slot >= self.seen.len() {
            self.seen.resize(slot + 1, false);
        }
        if !self.seen[slot] {
            self.seen[slot] = true;
            self.list.push(slot);
        }
    }

    fn mark_all(&mut self) {
        self.marks = self.marks.wrapping_add(1);
        self.all = true;
    }

    /// Marks taken so far.
    pub(super) fn marks(&self) -> u64 {
        self.marks
    }

    /// (Tests.) Whether `slot` is marked.
    #[cfg(test)]
    pub(super) fn has(&self, slot: usize) -> bool {
        self.all || self.seen.get(slot).copied().unwrap_or(false)
    }

    /// The slots marked, in the order they were first marked (`None`: all of them).
    pub(super) fn slots(&self) -> Option<&[usize]> {
        (!self.all).then_some(self.list.as_slice())
    }

    fn clear(&mut self) {
        for &slot in &self.list {
            self.seen[slot] = false;
        }
        self.list.clear();
        self.all = false;
    }
}

/// The slots, by id (`slots[i].id == i`). Reads through [`Deref`] to a slice; writes through
/// [`IndexMut`], [`get_mut`](Slots::get_mut), [`iter_mut`](Slots::iter_mut) and the rest mark
/// what they reach.
#[derive(Debug, Clone, Default)]
pub(super) struct Slots {
    slots: Vec<Slot>,
    touched: Touched,
}

impl Slots {
    pub(super) fn get_mut(&mut self, slot: usize) -> Option<&mut Slot> {
        self.touched.mark(slot);
        self.slots.get_mut(slot)
    }

    pub(super) fn iter_mut(&mut self) -> std::slice::IterMut<'_, Slot> {
        self.touched.mark_all();
        self.slots.iter_mut()
    }

    pub(super) fn push(&mut self, slot: Slot) {
        self.touched.mark_all();
        self.slots.push(slot);
    }

    pub(super) fn drain(&mut self, from: std::ops::RangeFrom<usize>) -> std::vec::Drain<'_, Slot> {
        self.touched.mark_all();
        self.slots.drain(from)
    }

    /// What was marked since [`clear_touched`](Slots::clear_touched).
    pub(super) fn touched(&self) -> &Touched {
        &self.touched
    }

    pub(super) fn clear_touched(&mut self) {
        self.touched.clear();
    }
}

impl FromIterator<Slot> for Slots {
    fn from_iter<I: IntoIterator<Item = Slot>>(iter: I) -> Slots {
        Slots { slots: iter.into_iter().collect(), touched: Touched { all: true, ..Touched::default() } }
    }
}

impl Deref for Slots {
    type Target = [Slot];
    fn deref(&self) -> &[Slot] {
        &self.slots
    }
}

impl Index<usize> for Slots {
    type Output = Slot;
    fn index(&self, slot: usize) -> &Slot {
        &self.slots[slot]
    }
}

impl IndexMut<usize> for Slots {
    fn index_mut(&mut self, slot: usize) -> &mut Slot {
        self.touched.mark(slot);
        &mut self.slots[slot]
    }
}

impl<'a> IntoIterator for &'a Slots {
    type Item = &'a Slot;
    type IntoIter = std::slice::Iter<'a, Slot>;
    fn into_iter(self) -> Self::IntoIter {
        self.slots.iter()
    }
}

impl<'a> IntoIterator for &'a mut Slots {
    type Item = &'a mut Slot;
    type IntoIter = std::slice::IterMut<'a, Slot>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter_mut()
    }
}

/// Workers asked to stop that no slot counts any more, each with the slot it served (a removed
/// slot's id may be past the last slot). A change marks the slot of the entry it reaches.
#[derive(Debug, Clone, Default)]
pub(super) struct Retiring {
    procs: Vec<(usize, Proc)>,
    touched: Touched,
}

impl Retiring {
    pub(super) fn push(&mut self, entry: (usize, Proc)) {
        self.touched.mark(entry.0);
        self.procs.push(entry);
    }

    pub(super) fn swap_remove(&mut self, i: usize) -> (usize, Proc) {
        let entry = self.procs.swap_remove(i);
        self.touched.mark(entry.0);
        entry
    }

    pub(super) fn get_mut(&mut self, i: usize) -> Option<&mut (usize, Proc)> {
        let entry = self.procs.get_mut(i)?;
        self.touched.mark(entry.0);
        Some(entry)
    }

    pub(super) fn iter_mut(&mut self) -> std::slice::IterMut<'_, (usize, Proc)> {
        self.into_iter()
    }

    /// What was marked since [`clear_touched`](Retiring::clear_touched).
    pub(super) fn touched(&self) -> &Touched {
        &self.touched
    }

    pub(super) fn clear_touched(&mut self) {
        self.touched.clear();
    }
}

impl Deref for Retiring {
    type Target = [(usize, Proc)];
    fn deref(&self) -> &[(usize, Proc)] {
        &self.procs
    }
}

impl<'a> IntoIterator for &'a Retiring {
    type Item = &'a (usize, Proc);
    type IntoIter = std::slice::Iter<'a, (usize, Proc)>;
    fn into_iter(self) -> Self::IntoIter {
        self.procs.iter()
    }
}

impl<'a> IntoIterator for &'a mut Retiring {
    type Item = &'a mut (usize, Proc);
    type IntoIter = std::slice::IterMut<'a, (usize, Proc)>;
    fn into_iter(self) -> Self::IntoIter {
        for (slot, _) in &self.procs {
            self.touched.mark(*slot);
        }
        self.procs.iter_mut()
    }
}

/// The earlier of two optional deadlines (`None`: never).
pub(super) fn earlier(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A minimum tree over one optional deadline per slot (`None`: never): the earliest in O(1),
/// a change in O(log N), the slots whose deadline came in O(k log N) for k of them.
#[derive(Debug, Clone, Default)]
pub(super) struct DeadlineTree {
    /// Leaves from `width` on (slot i at `width + i`); node n holds the earlier of 2n and 2n + 1.
    nodes: Vec<Option<Instant>>,
    width: usize,
}

impl DeadlineTree {
    /// A tree over `deadlines`, in slot order.
    pub(super) fn build(deadlines: impl ExactSizeIterator<Item = Option<Instant>>) -> DeadlineTree {
        let width = deadlines.len().next_power_of_two().max(1);
        let mut nodes = vec![None; 2 * width];
        for (i, d) in deadlines.enumerate() {
            nodes[width + i] = d;
        }
        for n in (1..width).rev() {
            nodes[n] = earlier(nodes[2 * n], nodes[2 * n + 1]);
        }
        DeadlineTree { nodes, width }
    }

    /// How many slots it covers (at least).
    pub(super) fn covers(&self, slots: usize) -> bool {
        slots <= self.width && !self.nodes.is_empty()
    }

    pub(super) fn set(&mut self, slot: usize, deadline: Option<Instant>) {
        let mut n = self.width + slot;
        if self.nodes[n] == deadline {
            return;
        }
        self.nodes[n] = deadline;
        while n > 1 {
            n /= 2;
            let d = earlier(self.nodes[2 * n], self.nodes[2 * n + 1]);
            if self.nodes[n] == d {
                break;
            }
            self.nodes[n] = d;
        }
    }

    /// (Tests.) Slot `slot`'s deadline.
    #[cfg(test)]
    pub(super) fn leaf(&self, slot: usize) -> Option<Instant> {
        self.nodes[self.width + slot]
    }

    /// The earliest deadline of all.
    pub(super) fn earliest(&self) -> Option<Instant> {
        self.nodes.get(1).copied().flatten()
    }

    /// Adds to `due` the slots whose deadline is at or before `now`, in slot order.
    pub(super) fn due(&self, now: Instant, due: &mut Vec<usize>) {
        fn walk(tree: &DeadlineTree, n: usize, now: Instant, due: &mut Vec<usize>) {
            if tree.nodes[n].is_none_or(|d| d > now) {
                return;
            }
            if n >= tree.width {
                due.push(n - tree.width);
            } else {
                walk(tree, 2 * n, now, due);
                walk(tree, 2 * n + 1, now, due);
            }
        }
        if self.nodes.len() > 1 {
            walk(self, 1, now, due);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_tree_keeps_the_earliest_and_finds_what_is_due() {
        let t0 = Instant::now();
        let at = |ms: u64| Some(t0 + Duration::from_millis(ms));
        let mut tree = DeadlineTree::build([at(50), None, at(20), at(90), None].into_iter());
        assert!(tree.covers(5) && tree.covers(8) && !tree.covers(9));
        assert_eq!(tree.earliest(), at(20));
        let mut due = Vec::new();
        tree.due(t0 + Duration::from_millis(50), &mut due);
        assert_eq!(due, [0, 2]);
        tree.set(2, None);
        assert_eq!(tree.earliest(), at(50));
        tree.set(4, at(10));
        assert_eq!(tree.earliest(), at(10));
        tree.set(0, None);
        tree.set(3, None);
        tree.set(4, None);
        assert_eq!(tree.earliest(), None);
        due.clear();
        tree.due(t0 + Duration::from_secs(10), &mut due);
        assert!(due.is_empty());
        let empty = DeadlineTree::build(std::iter::empty());
        assert_eq!(empty.earliest(), None);
    }

    #[test]
    fn touched_slots_are_listed_once_until_cleared() {
        let mut t = Touched::default();
        t.mark(3);
        t.mark(1);
        t.mark(3);
        assert_eq!(t.slots(), Some(&[3, 1][..]));
        t.clear();
        assert_eq!(t.slots(), Some(&[][..]));
        t.mark(2);
        t.mark_all();
        assert_eq!(t.slots(), None);
        t.clear();
        t.mark(2);
        assert_eq!(t.slots(), Some(&[2][..]));
    }
}
