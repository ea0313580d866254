//! The history window: the last N messages, trimmed so that tool calls and their results are never
//! separated (models reject a tool message without its call, and a call without all its results).

use std::collections::HashSet;

use crate::domain::{Role, WindowMessage};

/// Keeps at most `max` of the newest messages, then drops any tool message whose calling assistant
/// message is not in the window and any assistant tool-call message whose results are not all
/// right after it. `messages` must be oldest first.
pub fn fit_window(mut messages: Vec<WindowMessage>, max: usize) -> Vec<WindowMessage> {
    let skip = messages.len().saturating_sub(max);
    messages.drain(..skip);
    // Mark what to keep, then move it out: no message is cloned.
    let mut keep = vec![true; messages.len()];
    let mut i = 0;
    while i < messages.len() {
        if messages[i].calls_tools() {
            let end = group_end(&messages, i);
            if !group_is_complete(&messages[i..end]) {
                keep[i..end].fill(false);
            }
            i = end;
        } else {
            keep[i] = messages[i].role != Role::Tool;
            i += 1;
        }
    }
    let mut kept = keep.into_iter();
    messages.retain(|_| kept.next().unwrap_or(false));
    messages
}

/// The index after the tool messages that follow the tool-call message at `start`.
fn group_end(messages: &[WindowMessage], start: usize) -> usize {
    let mut end = start + 1;
    while end < messages.len() && messages[end].role == Role::Tool {
        end += 1;
    }
    end
}

/// Whether the tool messages after the call answer every call exactly once, and nothing else.
fn group_is_complete(group: &[WindowMessage]) -> bool {
    let calls: HashSet<&str> = group[0].tool_calls.iter().flatten().map(|c| c.id.as_str()).collect();
    let answers: Vec<&str> = group[1..].iter().filter_map(|m| m.tool_call_id.as_deref()).collect();
    let answered: HashSet<&str> = answers.iter().copied().collect();
    answers.len() == group.len() - 1 && answered.len() == answers.len() && answered == calls
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Message, ToolCall, new_id};
    use proptest::prelude::*;

    /// A history of turns; each turn is a user message, then `rounds` tool rounds of `calls`
    /// calls each, then the final assistant answer.
    fn history(turns: &[(usize, usize)]) -> Vec<WindowMessage> {
        let mut out = Vec::new();
        for (t, &(rounds, calls)) in turns.iter().enumerate() {
            let turn = new_id();
            out.push(Message::new("s", turn, Role::User, format!("q{t}")));
            for r in 0..rounds {
                let mut call = Message::new("s", turn, Role::Assistant, "");
                let ids: Vec<String> = (0..calls).map(|c| format!("call_{t}_{r}_{c}")).collect();
                call.tool_calls = Some(
                    ids.iter()
                        .map(|id| ToolCall {
                            id: id.clone(),
                            name: "x".into(),
                            arguments: serde_json::json!({}),
                        })
                        .collect(),
                );
                out.push(call);
                for id in ids {
                    let mut result = Message::new("s", turn, Role::Tool, "r");
                    result.tool_call_id = Some(id);
                    out.push(result);
                }
            }
            out.push(Message::new("s", turn, Role::Assistant, format!("a{t}")));
        }
        out.into_iter().map(WindowMessage::from).collect()
    }

    fn assert_well_formed(window: &[WindowMessage]) {
        let mut i = 0;
        while i < window.len() {
            let m = &window[i];
            assert_ne!(m.role, Role::Tool, "tool message at {i} without its call");
            if m.calls_tools() {
                let end = group_end(window, i);
                assert!(group_is_complete(&window[i..end]), "incomplete tool group at {i}");
                i = end;
            } else {
                i += 1;
            }
        }
    }

    proptest! {
        #[test]
        fn windows_never_break_a_tool_pair_and_are_a_suffix(
            turns in prop::collection::vec((0usize..4, 1usize..4), 0..12),
            max in 0usize..40,
        ) {
            let all = history(&turns);
            let window = fit_window(all.clone(), max);
            prop_assert!(window.len() <= max);
            assert_well_formed(&window);
            // Only a partial group at the front is dropped: the window is a suffix of the history.
            prop_assert!(all.ends_with(&window));
            // And it is the longest such suffix within `max`.
            let naive_start = all.len().saturating_sub(max);
            let dropped = all.len() - naive_start - window.len();
            prop_assert!(all[naive_start..naive_start + dropped].iter().all(|m| m.role != Role::User));
        }
    }

    #[test]
    fn a_group_cut_at_the_front_is_dropped_whole() {
        let all = history(&[(1, 2), (0, 1)]);
        // [u, call(2), tool, tool, a, u, a]; the last 5 start at the second tool message.
        let window = fit_window(all.clone(), 5);
        assert_eq!(window, all[4..].to_vec());
        let window = fit_window(all.clone(), 6);
        assert_eq!(window, all[1..].to_vec(), "a whole group fits");
        assert_eq!(fit_window(all.clone(), 7), all);
    }

    #[test]
    fn a_call_missing_a_result_in_the_middle_is_dropped() {
        let mut all = history(&[(1, 2)]);
        all.remove(3); // lose one of the two results
        let window = fit_window(all.clone(), 10);
        assert_eq!(window.iter().map(|m| m.role).collect::<Vec<_>>(), vec![Role::User, Role::Assistant]);
    }
}
